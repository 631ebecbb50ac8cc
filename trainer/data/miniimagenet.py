"""mini-ImageNet (Vinyals et al. 2016) with the Ravi & Larochelle (2017) split: 64 / 16 / 20 classes of 600 images.

Expected layout (as distributed with Ravi & Larochelle's code): `train.csv`, `val.csv` and `test.csv`, each with the
header `filename,label`, and an `images/` folder holding the files they name. Images are resized to 84x84 with
LANCZOS (as cbfinn/maml's proc_images.py) and stored as uint8 RGB, channels first; the preprocessing x/255 is applied
on the device by the sampler. Each split is decoded once and cached like Omniglot (see `trainer.data.arraycache`),
keyed by the CSV's sha256 and the sizes and mtimes of the images it names.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import warnings
from pathlib import Path

import numpy as np
import torch

from trainer.data import arraycache
from trainer.data.sampler import TaskSampler, scale_uint8

ROOT_ENV = "FASTADAPT_MINIIMAGENET"
SPLITS = ("train", "val", "test")
SIZE = 84
HEADER = ["filename", "label"]


def _root(root) -> Path:
    if root not in (None, ""):
        return Path(root).expanduser()
    if os.environ.get(ROOT_ENV):
        return Path(os.environ[ROOT_ENV]).expanduser()
    raise FileNotFoundError(f"mini-ImageNet location not given: pass root=... or set ${ROOT_ENV}")


def _read_csv(root: Path, split: str) -> tuple[bytes, dict[str, list[str]]]:
    """The CSV's bytes and its filenames by label, labels sorted, filenames in CSV order."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r}, expected one of {SPLITS}")
    path = root / f"{split}.csv"
    if not path.is_file():
        raise FileNotFoundError(
            f"mini-ImageNet {split} split not found: expected {path} (and {root / 'images'}/); "
            f"pass root=... or set ${ROOT_ENV}"
        )
    raw = path.read_bytes()
    rows = list(csv.reader(io.StringIO(raw.decode("utf-8-sig"))))
    if not rows or [c.strip() for c in rows[0]] != HEADER:
        raise ValueError(f"{path}: header is {rows[0] if rows else 'missing'}, expected {','.join(HEADER)}")
    by_label: dict[str, list[str]] = {}
    for line, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        if len(row) != 2 or not row[0].strip() or not row[1].strip():
            raise ValueError(f"{path}:{line}: row {row}, expected filename,label")
        by_label.setdefault(row[1].strip(), []).append(row[0].strip())
    if not by_label:
        raise ValueError(f"{path}: no rows after the header")
    return raw, dict(sorted(by_label.items()))


def decode_image(path: str) -> np.ndarray:
    """One image file -> uint8 [3, 84, 84] RGB, channels first."""
    from PIL import Image

    with Image.open(path) as image:
        rgb = image.convert("RGB")
    resized = rgb.resize((SIZE, SIZE), resample=Image.Resampling.LANCZOS)
    return np.ascontiguousarray(np.asarray(resized, dtype=np.uint8).transpose(2, 0, 1))


def _equal_counts(path: Path, by_label: dict[str, list[str]]) -> dict[str, list[str]]:
    counts = {label: len(files) for label, files in by_label.items()}
    fewest = min(counts.values())
    if fewest != max(counts.values()):
        short = {label: n for label, n in counts.items() if n != max(counts.values())}
        warnings.warn(
            f"{path}: classes have unequal image counts (min {fewest}, max {max(counts.values())}; {short}); "
            f"truncating every class to {fewest}",
            stacklevel=3,
        )
    return {label: files[:fewest] for label, files in by_label.items()}


def miniimagenet_classes(root=None, split: str = "train") -> list[str]:
    """The class labels of a split, in the order of the first axis of `load_miniimagenet`."""
    return list(_read_csv(_root(root), split)[1])


def load_miniimagenet(root=None, split: str = "train", cache_dir=None) -> np.ndarray:
    """uint8 [n_classes, n_per_class, 3, 84, 84] of one split; classes sorted by label, images in CSV order.

    root: the folder with {train,val,test}.csv and images/ (default $FASTADAPT_MINIIMAGENET). cache_dir: default
    $FASTADAPT_CACHE, else ~/.cache/fastadapt. Classes with more images than the smallest are truncated (a warning).
    """
    root = _root(root)
    raw, by_label = _read_csv(root, split)
    by_label = _equal_counts(root / f"{split}.csv", by_label)
    images_dir = root / "images"
    paths = [images_dir / name for files in by_label.values() for name in files]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"{root / f'{split}.csv'} names {len(missing)} image(s) missing under {images_dir}, e.g. {missing[:3]}"
        )
    key = arraycache.entry_key(
        "miniimagenet", split, SIZE, hashlib.sha256(raw).hexdigest(), arraycache.files_key(paths, root)
    )
    folder = arraycache.cache_dir(cache_dir)
    path = arraycache.entry_path(folder, f"miniimagenet-{split}", key)
    arrays = arraycache.load_entry(path, key, ("images",))
    if arrays is None:
        pixels = arraycache.decode_all(decode_image, [str(p) for p in paths], desc=f"decoding mini-ImageNet {split}")
        arrays = {"images": pixels.reshape(len(by_label), -1, 3, SIZE, SIZE), "classes": np.array(list(by_label))}
        arraycache.save_entry(path, key, arrays)
    return arrays["images"]


def miniimagenet_sampler(split_images, ways: int, shots: int, queries: int, rotate: bool = False, seed: int = 0,
                         device: str | torch.device = "cpu") -> TaskSampler:
    """A sampler over one mini-ImageNet split (uint8 [n, m, 3, 84, 84]) with the preprocessing x/255."""
    return TaskSampler(split_images, ways, shots, queries, rotate=rotate, seed=seed, device=device,
                       preprocess=scale_uint8)
