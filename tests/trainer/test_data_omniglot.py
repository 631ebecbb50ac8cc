"""Omniglot loading, caching and splits: the real archives (built once per session into a temporary cache folder)
and tiny synthetic folders for the cache-key, layout and error paths."""

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from trainer.data import load_omniglot, omniglot_split, omniglot_split_indices, split_info
from trainer.data import omniglot as omniglot_module


@pytest.fixture(scope="session")
def omniglot(omniglot_root, tmp_path_factory):
    """The real data set, decoded once per test session into a temporary cache folder (never ~/.cache)."""
    return load_omniglot(omniglot_root, cache_dir=tmp_path_factory.mktemp("omniglot-cache"))


def reference_pixels(png: bytes) -> np.ndarray:
    """The cbfinn/maml preprocessing written out independently: 1-bit PNG -> 'L' -> 28x28 LANCZOS, raw pixels."""
    image = Image.open(io.BytesIO(png)).convert("L").resize((28, 28), Image.Resampling.LANCZOS)
    return np.array(image)


def write_fake_omniglot(root: Path, characters: int = 2, drawings: int = 20, seed: int = 0) -> Path:
    """Extracted-folder layout with `characters` characters in each of two alphabets per part, random 1-bit PNGs."""
    rng = np.random.default_rng(seed)
    for part in omniglot_module.PARTS:
        for alphabet in ("Beta_script", "Alpha_script"):
            for c in range(1, characters + 1):
                folder = root / part / f"{part[7:]}_{alphabet}" / f"character{c:02d}"
                folder.mkdir(parents=True)
                for d in range(1, drawings + 1):
                    bits = rng.random((105, 105)) > 0.1  # mostly white, dark strokes
                    Image.fromarray(bits).convert("1").save(folder / f"{c:04d}_{d:02d}.png")
    return root


def zip_folder(src: Path, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for part in omniglot_module.PARTS:
        with zipfile.ZipFile(dest / f"{part}.zip", "w") as zf:
            for path in sorted((src / part).rglob("*.png")):
                zf.write(path, path.relative_to(src).as_posix())
    return dest


class BuildCounter:
    def __init__(self, monkeypatch):
        self.calls = 0
        original = omniglot_module._build

        def counting(*args, **kwargs):
            self.calls += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(omniglot_module, "_build", counting)


def test_counts_and_order(omniglot):
    assert omniglot.images.shape == (1623, 20, 28, 28) and omniglot.images.dtype == np.uint8
    assert len(omniglot) == len(omniglot.alphabets) == len(omniglot.characters) == 1623
    assert omniglot.background.dtype == bool
    assert int(omniglot.background.sum()) == 964 and int((~omniglot.background).sum()) == 659
    assert omniglot.background[:964].all() and not omniglot.background[964:].any()  # background first
    assert len(set(omniglot.alphabets[:964])) == 30 and len(set(omniglot.alphabets[964:])) == 20
    assert len(set(omniglot.characters)) == 1623
    for part in (omniglot.characters[:964], omniglot.characters[964:]):
        assert part == sorted(part)
    assert all(c.startswith(a + "/character") for a, c in zip(omniglot.alphabets, omniglot.characters, strict=True))
    # Raw pixels, as the PNGs store them: mostly white paper with dark strokes.
    assert omniglot.images.mean() > 200 and omniglot.images.min() == 0 and omniglot.images.max() == 255


def test_pixels_equal_a_direct_decode(omniglot, omniglot_root):
    rng = np.random.default_rng(1)
    for character in [0, 963, 964, 1622, *rng.integers(0, 1623, 4)]:
        part = "images_background" if omniglot.background[character] else "images_evaluation"
        with zipfile.ZipFile(omniglot_root / f"{part}.zip") as zf:
            prefix = f"{part}/{omniglot.characters[character]}/"
            members = sorted(n for n in zf.namelist() if n.startswith(prefix) and n.endswith(".png"))
            assert len(members) == 20
            for drawing in (0, int(rng.integers(1, 20)), 19):
                expected = reference_pixels(zf.read(members[drawing]))
                np.testing.assert_array_equal(omniglot.images[character, drawing], expected)


def test_cache_is_reused(omniglot, omniglot_root, monkeypatch):
    assert omniglot.cache_path.is_file()
    counter = BuildCounter(monkeypatch)
    again = load_omniglot(omniglot_root, cache_dir=omniglot.cache_path.parent)
    assert counter.calls == 0
    np.testing.assert_array_equal(again.images, omniglot.images)
    assert again.characters == omniglot.characters and again.alphabets == omniglot.alphabets
    np.testing.assert_array_equal(again.background, omniglot.background)


def test_cache_rebuilt_when_the_source_changes(tmp_path, monkeypatch):
    root = write_fake_omniglot(tmp_path / "omniglot")
    counter = BuildCounter(monkeypatch)
    first = load_omniglot(root, cache_dir=tmp_path / "cache")
    assert counter.calls == 1 and first.images.shape == (8, 20, 28, 28)
    load_omniglot(root, cache_dir=tmp_path / "cache")
    assert counter.calls == 1
    png = root / "images_evaluation" / "evaluation_Alpha_script" / "character01" / "0001_01.png"
    Image.fromarray(np.zeros((105, 105), dtype=bool)).convert("1").save(png)  # an all-black drawing
    changed = load_omniglot(root, cache_dir=tmp_path / "cache")
    assert counter.calls == 2
    index = changed.characters.index("evaluation_Alpha_script/character01")
    assert (changed.images[index, 0] == 0).all() and not (first.images[index, 0] == 0).all()
    np.testing.assert_array_equal(np.delete(changed.images, index, 0), np.delete(first.images, index, 0))
    # A different recipe is a different entry.
    load_omniglot(root, cache_dir=tmp_path / "cache", resample="nearest")
    assert counter.calls == 3


def test_damaged_cache_entry_is_rebuilt(tmp_path, monkeypatch):
    root = write_fake_omniglot(tmp_path / "omniglot", characters=1)
    first = load_omniglot(root, cache_dir=tmp_path / "cache")
    first.cache_path.write_bytes(first.cache_path.read_bytes()[:1000])  # truncated
    counter = BuildCounter(monkeypatch)
    with pytest.warns(UserWarning, match="unreadable"):
        again = load_omniglot(root, cache_dir=tmp_path / "cache")
    assert counter.calls == 1
    np.testing.assert_array_equal(again.images, first.images)
    assert not list((tmp_path / "cache").glob("*.tmp"))


def test_zips_and_folders_give_the_same_array(tmp_path):
    folder = write_fake_omniglot(tmp_path / "folder")
    zipped = zip_folder(folder, tmp_path / "zipped")
    from_folder = load_omniglot(folder, cache_dir=tmp_path / "cache")
    from_zip = load_omniglot(zipped, cache_dir=tmp_path / "cache")
    assert from_folder.cache_path != from_zip.cache_path
    np.testing.assert_array_equal(from_folder.images, from_zip.images)
    assert from_folder.characters == from_zip.characters
    # background alphabets first, each part sorted
    assert from_zip.characters[:4] == [
        "background_Alpha_script/character01", "background_Alpha_script/character02",
        "background_Beta_script/character01", "background_Beta_script/character02",
    ]
    assert from_zip.background.tolist() == [True] * 4 + [False] * 4


def test_environment_variables_locate_data_and_cache(tmp_path, monkeypatch):
    root = write_fake_omniglot(tmp_path / "omniglot", characters=1)
    monkeypatch.setenv("FASTADAPT_OMNIGLOT", str(root))
    monkeypatch.setenv("FASTADAPT_CACHE", str(tmp_path / "env-cache"))
    data = load_omniglot()
    assert len(data) == 4 and data.cache_path.parent == tmp_path / "env-cache"


def test_missing_data_names_the_paths_and_the_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTADAPT_OMNIGLOT", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError) as err:
        load_omniglot(cache_dir=tmp_path / "cache")
    message = str(err.value)
    assert str(tmp_path / "nowhere") in message and str(tmp_path / "cache" / "omniglot") in message
    assert "FASTADAPT_OMNIGLOT" in message and "download=True" in message


def test_wrong_drawing_count_is_rejected(tmp_path):
    root = write_fake_omniglot(tmp_path / "omniglot", characters=1)
    next((root / "images_background").rglob("*_07.png")).unlink()
    with pytest.raises(ValueError, match="has 19 drawings, expected 20"):
        load_omniglot(root, cache_dir=tmp_path / "cache")


def test_download_checks_the_md5(tmp_path, monkeypatch, omniglot_root):
    """No network: urlopen serves the local re-packed zip, whose md5 differs from the official archive's."""

    class FakeResponse(io.BytesIO):
        headers = {}

    urls = []

    def fake_urlopen(url, timeout=None):
        urls.append(url)
        return FakeResponse((omniglot_root / "images_background.zip").read_bytes())

    monkeypatch.setattr(omniglot_module.urllib.request, "urlopen", fake_urlopen)
    with pytest.raises(OSError, match="expected 68d2efa1b9178cc56df9314c21c6e718"):
        load_omniglot(tmp_path / "dest", cache_dir=tmp_path / "cache", download=True)
    assert urls == ["https://github.com/brendenlake/omniglot/raw/master/python/images_background.zip"]
    assert not list((tmp_path / "dest").iterdir())  # nothing half-written left behind


@pytest.mark.parametrize(
    "split, val, counts",
    [("paper", 0, (1200, 0, 423)), ("paper", 100, (1100, 100, 423)), ("background", 0, (964, 0, 659)),
     ("background", 20, (944, 20, 659))],
)
def test_split_counts_and_disjointness(omniglot, split, val, counts):
    parts = omniglot_split(omniglot, split, seed=0, val_classes=val)
    assert [parts[k].shape for k in ("train", "val", "test")] == [(n, 20, 28, 28) for n in counts]
    assert all(p.dtype == np.uint8 for p in parts.values())
    idx = omniglot_split_indices(omniglot, split, seed=0, val_classes=val)
    every = np.concatenate([idx["train"], idx["val"], idx["test"]])
    assert len(np.unique(every)) == len(every) == 1623
    for name in ("train", "val", "test"):
        np.testing.assert_array_equal(parts[name], omniglot.images[idx[name]])
    if split == "background":
        assert omniglot.background[idx["train"]].all() and omniglot.background[idx["val"]].all()
        assert not omniglot.background[idx["test"]].any()


def test_splits_depend_on_the_seed_only(omniglot):
    a = omniglot_split_indices(omniglot, "paper", seed=0, val_classes=100)
    b = omniglot_split_indices(omniglot, "paper", seed=0, val_classes=100)
    c = omniglot_split_indices(omniglot, "paper", seed=1, val_classes=100)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["test"], c["test"])
    # Holding out validation classes takes them from the meta-train pool; the meta-test set is unchanged.
    no_val = omniglot_split_indices(omniglot, "paper", seed=0, val_classes=0)
    np.testing.assert_array_equal(np.sort(np.concatenate([a["train"], a["val"]])), no_val["train"])
    np.testing.assert_array_equal(a["test"], no_val["test"])


def test_split_info_is_compact_provenance(omniglot):
    info = split_info(omniglot, "paper", seed=0, val_classes=100)
    assert json.loads(json.dumps(info)) == info and len(json.dumps(info)) < 1000
    assert info["split"] == "paper" and info["seed"] == 0 and info["val_classes"] == 100
    assert info["counts"] == {"train": 1100, "val": 100, "test": 423}
    assert info == split_info(omniglot, "paper", seed=0, val_classes=100)
    other = split_info(omniglot, "paper", seed=1, val_classes=100)
    assert other["classes_sha256"]["test"] != info["classes_sha256"]["test"]
    assert other["pixels_sha256"] == info["pixels_sha256"]


def test_split_errors(omniglot):
    with pytest.raises(ValueError, match="split='tiny', expected one of"):
        omniglot_split(omniglot, "tiny")
    with pytest.raises(ValueError, match="val_classes=964, expected 0 <= val_classes < 964"):
        omniglot_split(omniglot, "background", val_classes=964)
    with pytest.raises(ValueError, match="val_classes=-1"):
        omniglot_split(omniglot, "paper", val_classes=-1)
    with pytest.raises(ValueError, match="resample='bicubic'"):
        load_omniglot(resample="bicubic")


def test_fetch_is_a_no_op_where_the_data_is_and_downloads_once_where_it_is_not(tmp_path, monkeypatch, capsys):
    """`make data`: never downloads here (the download is stubbed; test_download_checks_the_md5 covers the real one)."""
    from trainer.data import fetch

    fetched = []

    def fake_download(dest):
        fetched.append(Path(dest))
        zip_folder(write_fake_omniglot(tmp_path / "src", characters=1, drawings=2), Path(dest))
        return Path(dest)

    monkeypatch.setattr(fetch, "download_omniglot", fake_download)
    present = write_fake_omniglot(tmp_path / "present", characters=1, drawings=2)
    assert fetch.main([str(present)]) == 0 and fetched == []
    assert "nothing to fetch" in capsys.readouterr().out
    monkeypatch.setenv("FASTADAPT_OMNIGLOT", str(tmp_path / "empty"))
    assert fetch.main([]) == 0 and fetched == [tmp_path / "empty"]
    assert fetch.main([]) == 0 and len(fetched) == 1  # the second time it is there


def test_fetch_failure_says_what_to_do(tmp_path, monkeypatch, capsys):
    from trainer.data import fetch

    def offline(dest):
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    monkeypatch.setattr(fetch, "download_omniglot", offline)
    assert fetch.main([str(tmp_path / "none")]) == 1
    err = capsys.readouterr().err
    assert "name resolution" in err and "images_evaluation.zip" in err and "$FASTADAPT_OMNIGLOT" in err
