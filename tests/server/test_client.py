"""The client's image helper and its command line, on real Omniglot PNGs."""

from __future__ import annotations

import io
import zipfile

import numpy as np
import onnx
import pytest
from PIL import Image

from server.client import load_image, load_labelled_folder, main


@pytest.fixture(scope="module")
def omniglot_characters(omniglot_root):
    """Five evaluation characters: {name: [png bytes of its 20 drawings]}."""
    with zipfile.ZipFile(omniglot_root / "images_evaluation.zip") as archive:
        names = sorted(n for n in archive.namelist() if n.endswith(".png"))
        chars: dict[str, list[bytes]] = {}
        for name in names:
            char = "/".join(name.split("/")[1:3])
            if char not in chars and len(chars) == 5:
                break
            chars.setdefault(char, []).append(archive.read(name))
    return chars


def test_load_image_resizes_with_lanczos_and_keeps_the_dataset_colours(omniglot_characters, tmp_path):
    png = next(iter(omniglot_characters.values()))[0]
    x = load_image(png, (1, 28, 28))
    assert x.shape == (1, 28, 28) and x.dtype == np.uint8
    original = np.asarray(Image.open(io.BytesIO(png)).convert("L"))
    expected = np.asarray(Image.fromarray(original).resize((28, 28), Image.Resampling.LANCZOS))
    np.testing.assert_array_equal(x[0], expected)
    assert np.median(x) == 255 and x.min() < 128  # white background, dark strokes, as stored
    path = tmp_path / "a.png"
    path.write_bytes(png)
    rgb = load_image(path, (3, 84, 84))
    assert rgb.shape == (3, 84, 84) and (rgb[0] == rgb[1]).all()
    with pytest.raises(ValueError, match=r"input_shape \(2, 28, 28\)"):
        load_image(png, (2, 28, 28))


def write_folders(root, characters, per_class):
    """root/<class>/<i>.png for the first per_class drawings of each character; returns the class names."""
    classes = []
    for c, (name, pngs) in enumerate(characters.items()):
        folder = root / f"class{c}_{name.replace('/', '_')}"
        folder.mkdir(parents=True)
        for i, png in enumerate(pngs[per_class]):
            (folder / f"{i}.png").write_bytes(png)
        classes.append(folder.name)
    return classes


def test_cli_classifies_a_query_folder(server, omniglot_characters, tmp_path, capsys):
    classes = write_folders(tmp_path / "support", omniglot_characters, slice(0, 1))
    write_folders(tmp_path / "query", omniglot_characters, slice(1, 3))
    x, y, names, _ = load_labelled_folder(tmp_path / "support", (1, 28, 28))
    assert x.shape == (5, 1, 28, 28) and names == classes and list(y) == [0, 1, 2, 3, 4]

    onnx_path = tmp_path / "adapted.onnx"
    code = main(["--address", server.address, "classify", "--model", "tiny-5w", "--support",
                 str(tmp_path / "support"), "--query", str(tmp_path / "query"), "--export", str(onnx_path)])
    out = capsys.readouterr().out
    assert code == 0, out
    lines = [line for line in out.splitlines() if "\t" in line]
    assert len(lines) == 10 and all(line.split("\t")[1] in classes for line in lines)
    assert "accuracy" in out and "on 10 query images" in out
    assert {p.key for p in onnx.load(onnx_path).metadata_props} >= {"fastadapt.preprocessing"}

    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "q.png").write_bytes(next(iter(omniglot_characters.values()))[5])
    code = main(["--address", server.address, "classify", "--model", "tiny-5w", "--support",
                 str(tmp_path / "support"), "--query", str(flat)])
    out = capsys.readouterr().out
    assert code == 0 and "q.png" in out and "accuracy" not in out


def test_cli_lists_models_and_reports_errors(server, omniglot_characters, tmp_path, capsys):
    assert main(["--address", server.address, "models"]) == 0
    assert "tiny-5w\tconv4-omniglot\t5-way" in capsys.readouterr().out
    write_folders(tmp_path / "support", dict(list(omniglot_characters.items())[:3]), slice(0, 1))
    code = main(["--address", server.address, "classify", "--model", "tiny-5w", "--support",
                 str(tmp_path / "support"), "--query", str(tmp_path / "support")])
    assert code == 2 and "has 3 class folders, model tiny-5w is 5-way" in capsys.readouterr().err
    code = main(["--address", server.address, "classify", "--model", "nope", "--support",
                 str(tmp_path / "support"), "--query", str(tmp_path / "support")])
    assert code == 1 and "NOT_FOUND" in capsys.readouterr().err
    code = main(["--address", server.address, "classify", "--model", "tiny-5w", "--support",
                 str(tmp_path / "nowhere"), "--query", str(tmp_path / "support")])
    assert code == 2 and "expected a folder with one subfolder of images per class" in capsys.readouterr().err
