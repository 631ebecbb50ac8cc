"""mini-ImageNet on a tiny synthetic Ravi & Larochelle folder: 3 classes x 4 random-colour images of odd sizes per
split, written by the test."""

import numpy as np
import pytest
import torch
from PIL import Image

from trainer.data import load_miniimagenet, miniimagenet_classes, miniimagenet_sampler
from trainer.data import miniimagenet as miniimagenet_module

SIZES = [(100, 120), (50, 40), (84, 84), (300, 97)]
MODES = ["RGB", "L", "RGBA", "P"]


def write_fake_miniimagenet(root, classes=3, per_class=4, seed=0):
    """{train,val,test}.csv + images/: per split `classes` labels (listed out of order), `per_class` images each."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    for split in ("train", "val", "test"):
        rows = ["filename,label"]
        labels = [f"n0{split}{c}" for c in range(classes)][::-1]  # reverse: the loader must sort them
        for i in range(per_class):
            for c, label in enumerate(labels):
                w, h = SIZES[(i + c) % len(SIZES)]
                mode = MODES[(i + 2 * c) % len(MODES)]
                pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                image = Image.fromarray(pixels).convert(mode)
                name = f"{label}{i:08d}.{'jpg' if mode in ('RGB', 'L') and i % 2 else 'png'}"
                image.save(root / "images" / name)
                rows.append(f"{name},{label}")
        (root / f"{split}.csv").write_text("\n".join(rows) + "\n")
    return root


def reference_pixels(path) -> np.ndarray:
    image = Image.open(path).convert("RGB").resize((84, 84), Image.Resampling.LANCZOS)
    return np.array(image).transpose(2, 0, 1)


def test_splits_shapes_and_pixels(tmp_path):
    root = write_fake_miniimagenet(tmp_path / "mini")
    for split in ("train", "val", "test"):
        images = load_miniimagenet(root, split, cache_dir=tmp_path / "cache")
        assert images.shape == (3, 4, 3, 84, 84) and images.dtype == np.uint8
        classes = miniimagenet_classes(root, split)
        assert classes == sorted(classes) and len(classes) == 3
        rows = [line.split(",") for line in (root / f"{split}.csv").read_text().splitlines()[1:]]
        for c, label in enumerate(classes):
            files = [name for name, lab in rows if lab == label]
            for i, name in enumerate(files):
                np.testing.assert_array_equal(images[c, i], reference_pixels(root / "images" / name))


def test_cache_reuse_and_rebuild(tmp_path, monkeypatch):
    root = write_fake_miniimagenet(tmp_path / "mini")
    calls = []
    original = miniimagenet_module.arraycache.decode_all

    def counting(*args, **kwargs):
        calls.append(kwargs.get("desc"))
        return original(*args, **kwargs)

    monkeypatch.setattr(miniimagenet_module.arraycache, "decode_all", counting)
    first = load_miniimagenet(root, "train", cache_dir=tmp_path / "cache")
    again = load_miniimagenet(root, "train", cache_dir=tmp_path / "cache")
    assert len(calls) == 1 and np.array_equal(first, again)
    assert len(list((tmp_path / "cache").glob("miniimagenet-train-*.npz"))) == 1
    name = (root / "train.csv").read_text().splitlines()[1].split(",")[0]
    Image.new("RGB", (84, 84), (255, 0, 0)).save(root / "images" / name, format="PNG")
    changed = load_miniimagenet(root, "train", cache_dir=tmp_path / "cache")
    assert len(calls) == 2 and not np.array_equal(first, changed)
    assert (changed == first).mean() > 0.9  # only one image changed


def test_unequal_counts_are_truncated_with_a_warning(tmp_path):
    root = write_fake_miniimagenet(tmp_path / "mini")
    lines = (root / "val.csv").read_text().splitlines()
    dropped = next(line for line in lines[1:] if line.endswith(",n0val1"))
    (root / "val.csv").write_text("\n".join(line for line in lines if line != dropped) + "\n")
    with pytest.warns(UserWarning, match="unequal image counts.*truncating every class to 3"):
        images = load_miniimagenet(root, "val", cache_dir=tmp_path / "cache")
    assert images.shape == (3, 3, 3, 84, 84)


def test_errors_name_what_is_wrong(tmp_path, monkeypatch):
    root = write_fake_miniimagenet(tmp_path / "mini")
    monkeypatch.delenv("FASTADAPT_MINIIMAGENET", raising=False)
    for unset in (None, ""):
        with pytest.raises(FileNotFoundError, match="location not given.*FASTADAPT_MINIIMAGENET"):
            load_miniimagenet(unset, "train", cache_dir=tmp_path / "cache")
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'nowhere' / 'train.csv'}.*FASTADAPT_MINIIMAGENET"):
        load_miniimagenet(tmp_path / "nowhere", "train", cache_dir=tmp_path / "cache")
    with pytest.raises(ValueError, match="split='validation', expected one of"):
        load_miniimagenet(root, "validation", cache_dir=tmp_path / "cache")
    name = (root / "test.csv").read_text().splitlines()[2].split(",")[0]
    (root / "images" / name).unlink()
    with pytest.raises(FileNotFoundError, match=f"1 image\\(s\\) missing.*{name}"):
        load_miniimagenet(root, "test", cache_dir=tmp_path / "cache")
    (root / "val.csv").write_text("file,class\na.jpg,n01\n")
    with pytest.raises(ValueError, match="header is \\['file', 'class'\\], expected filename,label"):
        load_miniimagenet(root, "val", cache_dir=tmp_path / "cache")


def test_environment_variable_and_sampler(tmp_path, monkeypatch):
    root = write_fake_miniimagenet(tmp_path / "mini")
    monkeypatch.setenv("FASTADAPT_MINIIMAGENET", str(root))
    images = load_miniimagenet(split="test", cache_dir=tmp_path / "cache")
    sampler = miniimagenet_sampler(images, ways=3, shots=1, queries=3, seed=0)
    batch = sampler.sample(2)
    assert batch.support_x.shape == (2, 3, 3, 84, 84) and batch.query_x.shape == (2, 9, 3, 84, 84)
    source = torch.from_numpy(images)[batch.classes[:, :, None], batch.query_index.view(2, 3, 3)]
    assert torch.equal(batch.query_x, (source.float() / 255).view(2, 9, 3, 84, 84))
