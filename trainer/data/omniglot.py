"""Omniglot (Lake et al. 2015): 1623 handwritten characters from 50 alphabets, 20 drawings each, and its splits.

Preprocessing follows cbfinn/maml: each 105x105 PNG is resized to 28x28 with LANCZOS. The 1-bit image is converted
to 8-bit grayscale first, so the resize really filters (Pillow resizes mode '1' images with NEAREST whatever filter is
asked). Pixels are kept raw, as the PNGs store them: dark strokes on white. The float preprocessing (1 - x/255,
strokes 1.0) is `models.preprocess.preprocess_uint8`, applied on the device when task batches are built.

The decoded array is cached (see `trainer.data.arraycache`), keyed by the sha256 of the zips (or the sizes and mtimes
of the PNGs of an extracted folder), so only the first load decodes the 32,460 PNGs.
"""

from __future__ import annotations

import functools
import hashlib
import os
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trainer.data import arraycache

ROOT_ENV = "FASTADAPT_OMNIGLOT"
DEFAULT_ROOT = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "omniglot"
PARTS = ("images_background", "images_evaluation")
DRAWINGS = 20
SIZE = 28
RESAMPLE = ("lanczos", "nearest")
PAPER_TRAIN_CLASSES = 1200
SPLITS = ("paper", "background")
DOWNLOAD_URL = "https://github.com/brendenlake/omniglot/raw/master/python/{part}.zip"
DOWNLOAD_MD5 = {  # of the official archives (the md5s torchvision checks too)
    "images_background": "68d2efa1b9178cc56df9314c21c6e718",
    "images_evaluation": "6b91aef0f799c5bb55b94e3f2daec811",
}


@dataclass
class OmniglotData:
    """All Omniglot characters, background alphabets first, each part sorted by alphabet then character.

    images: uint8 [n_characters, 20, 28, 28], dark strokes on white; alphabets[i] and characters[i]
    ('alphabet/characterNN') name character i; background[i] is True for images_background.
    """

    images: np.ndarray
    alphabets: list[str]
    characters: list[str]
    background: np.ndarray
    cache_path: Path | None = None

    def __len__(self) -> int:
        return len(self.characters)


@dataclass(frozen=True)
class _Source:
    part: str  # images_background or images_evaluation
    path: Path  # the zip or the extracted folder

    @property
    def is_zip(self) -> bool:
        return self.path.suffix == ".zip"

    def _folder_pngs(self) -> dict[str, os.stat_result]:
        """Stat of every PNG at ALPHABET/characterNN/*.png by relative path (hidden entries skipped).

        os.scandir, not Path.rglob: keying an extracted folder (32,460 stats) stays well under a second.
        """

        def subdirs(path: str):
            with os.scandir(path) as entries:
                return sorted((e.name, e.path) for e in entries if e.is_dir() and not e.name.startswith("."))

        found = {}
        for alphabet, alphabet_path in subdirs(self.path):
            for character, character_path in subdirs(alphabet_path):
                with os.scandir(character_path) as entries:
                    for e in entries:
                        if e.name.endswith(".png") and not e.name.startswith(".") and e.is_file():
                            found[f"{alphabet}/{character}/{e.name}"] = e.stat()
        return dict(sorted(found.items()))

    def key(self) -> str:
        if self.is_zip:
            return arraycache.sha256_file(self.path)
        listing = "".join(f"{rel}\t{st.st_size}\t{st.st_mtime_ns}\n" for rel, st in self._folder_pngs().items())
        return hashlib.sha256(listing.encode()).hexdigest()

    def read(self) -> dict[str, bytes]:
        """PNG bytes by path relative to the part's top folder ('ALPHABET/characterNN/XXXX_YY.png')."""
        if self.is_zip:
            with zipfile.ZipFile(self.path) as zf:
                prefix = self.part + "/"
                return {
                    name[len(prefix) :]: zf.read(name)
                    for name in zf.namelist()
                    if name.startswith(prefix) and name.endswith(".png") and "/." not in name
                }
        return {rel: arraycache.read_bytes(self.path / rel) for rel in self._folder_pngs()}


def decode_png(blob: bytes, resample: str = "lanczos") -> np.ndarray:
    """One Omniglot PNG -> uint8 [28, 28] grayscale, dark strokes (the cbfinn/maml resize)."""
    from PIL import Image

    method = {"lanczos": Image.Resampling.LANCZOS, "nearest": Image.Resampling.NEAREST}[resample]
    image = arraycache.open_image_bytes(blob).convert("L")
    return np.asarray(image.resize((SIZE, SIZE), resample=method), dtype=np.uint8)


def _locate(folder: Path) -> list[_Source] | None:
    sources = []
    for part in PARTS:
        if (folder / f"{part}.zip").is_file():
            sources.append(_Source(part, folder / f"{part}.zip"))
        elif (folder / part).is_dir():
            sources.append(_Source(part, folder / part))
        else:
            return None
    return sources


def download_omniglot(dest: str | os.PathLike) -> Path:
    """Download the official images_{background,evaluation}.zip from github.com/brendenlake/omniglot into dest."""
    from tqdm import tqdm

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for part in PARTS:
        target = dest / f"{part}.zip"
        if target.exists():
            continue
        url = DOWNLOAD_URL.format(part=part)
        tmp = target.with_suffix(".zip.part")
        md5 = hashlib.md5()
        with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as f:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, desc=f"download {part}.zip", unit="B", unit_scale=True, leave=False) as bar:
                while block := response.read(1 << 20):
                    f.write(block)
                    md5.update(block)
                    bar.update(len(block))
        if md5.hexdigest() != DOWNLOAD_MD5[part]:
            tmp.unlink(missing_ok=True)
            raise OSError(f"download of {url} has md5 {md5.hexdigest()}, expected {DOWNLOAD_MD5[part]}")
        os.replace(tmp, target)
    return dest


def _find_sources(root, cache_folder: Path, download: bool) -> list[_Source]:
    if root not in (None, ""):
        primary, origin = Path(root).expanduser(), "the root argument"
    elif os.environ.get(ROOT_ENV):
        primary, origin = Path(os.environ[ROOT_ENV]).expanduser(), f"${ROOT_ENV}"
    else:
        primary, origin = DEFAULT_ROOT, "the default location"
    downloaded = cache_folder / "omniglot"
    tried = [primary] if primary == downloaded else [primary, downloaded]
    for folder in tried:
        if (sources := _locate(folder)) is not None:
            return sources
    if download:
        dest = downloaded if origin == "the default location" else primary
        download_omniglot(dest)
        if (sources := _locate(dest)) is not None:
            return sources
    wanted = " and ".join(f"{p}.zip (or an extracted {p}/ folder)" for p in PARTS)
    raise FileNotFoundError(
        f"Omniglot not found: expected {wanted} in {primary} ({origin}); tried {', '.join(map(str, tried))}. "
        f"Pass root=..., set ${ROOT_ENV}, or pass download=True to fetch the official archives."
    )


def _build(sources: list[_Source], resample: str) -> dict[str, np.ndarray]:
    names, blobs, alphabets, characters, background = [], [], [], [], []
    for source in sources:
        files = source.read()
        by_character: dict[tuple[str, str], list[str]] = {}
        for rel in files:
            parts = rel.split("/")
            if len(parts) != 3:
                raise ValueError(
                    f"{source.path}: unexpected PNG {source.part}/{rel}, expected ALPHABET/characterNN/XXXX_YY.png"
                )
            by_character.setdefault((parts[0], parts[1]), []).append(rel)
        if not by_character:
            raise ValueError(f"{source.path}: no PNGs under {source.part}/")
        for alphabet, character in sorted(by_character):
            drawings = sorted(by_character[alphabet, character])
            if len(drawings) != DRAWINGS:
                raise ValueError(
                    f"{source.path}: {alphabet}/{character} has {len(drawings)} drawings, expected {DRAWINGS}"
                )
            alphabets.append(alphabet)
            characters.append(f"{alphabet}/{character}")
            background.append(source.part == "images_background")
            names.extend(drawings)
            blobs.extend(files[d] for d in drawings)
    decode = functools.partial(decode_png, resample=resample)
    pixels = arraycache.decode_all(decode, blobs, desc="decoding Omniglot")
    return {
        "images": pixels.reshape(len(characters), DRAWINGS, SIZE, SIZE),
        "alphabets": np.array(alphabets),
        "characters": np.array(characters),
        "background": np.array(background, dtype=bool),
    }


def load_omniglot(root=None, cache_dir=None, download: bool = False, resample: str = "lanczos") -> OmniglotData:
    """Omniglot as uint8 [1623, 20, 28, 28], decoded once and cached.

    root: a folder holding images_background.zip and images_evaluation.zip (or the extracted folders); default
    $FASTADAPT_OMNIGLOT, else ../shared/data/omniglot next to the repository. cache_dir: default $FASTADAPT_CACHE,
    else ~/.cache/fastadapt. download=True fetches the official archives when none are found (into root, else into
    the cache folder). resample='nearest' reproduces what cbfinn/maml's resize script gets from Pillow.
    """
    if resample not in RESAMPLE:
        raise ValueError(f"resample={resample!r}, expected one of {RESAMPLE}")
    folder = arraycache.cache_dir(cache_dir)
    sources = _find_sources(root, folder, download)
    key = arraycache.entry_key("omniglot", SIZE, resample, *(f"{s.part}:{s.key()}" for s in sources))
    path = arraycache.entry_path(folder, "omniglot", key)
    fields = ("images", "alphabets", "characters", "background")
    arrays = arraycache.load_entry(path, key, fields)
    if arrays is None:
        arrays = _build(sources, resample)
        arraycache.save_entry(path, key, arrays)
    return OmniglotData(
        images=arrays["images"],
        alphabets=[str(a) for a in arrays["alphabets"]],
        characters=[str(c) for c in arrays["characters"]],
        background=arrays["background"].astype(bool),
        cache_path=path,
    )


def omniglot_split_indices(data: OmniglotData, split: str = "paper", seed: int = 0, val_classes: int = 0):
    """Character indices (sorted) of the 'train', 'val' and 'test' classes of a split.

    'paper': all characters shuffled with `seed`, the first 1200 meta-train (its last `val_classes` held out for
    validation, as cbfinn/maml holds out 100), the rest meta-test. 'background': meta-train on images_background
    (`val_classes` of them, drawn with `seed`, held out), meta-test on images_evaluation.
    """
    if split not in SPLITS:
        raise ValueError(f"split={split!r}, expected one of {SPLITS}")
    rng = np.random.default_rng(seed)
    if split == "paper":
        if len(data) <= PAPER_TRAIN_CLASSES:
            raise ValueError(f"the paper split needs more than {PAPER_TRAIN_CLASSES} characters, got {len(data)}")
        order = rng.permutation(len(data))
        pool, test = order[:PAPER_TRAIN_CLASSES], order[PAPER_TRAIN_CLASSES:]
    else:
        background = np.asarray(data.background, dtype=bool)
        pool, test = rng.permutation(np.flatnonzero(background)), np.flatnonzero(~background)
        if len(pool) == 0 or len(test) == 0:
            raise ValueError(
                f"the background split needs both parts, got {len(pool)} background, {len(test)} evaluation characters"
            )
    if not 0 <= val_classes < len(pool):
        raise ValueError(f"val_classes={val_classes}, expected 0 <= val_classes < {len(pool)} (the meta-train classes)")
    train, val = pool[: len(pool) - val_classes], pool[len(pool) - val_classes :]
    return {"train": np.sort(train), "val": np.sort(val), "test": np.sort(test)}


def omniglot_split(data: OmniglotData, split: str = "paper", seed: int = 0, val_classes: int = 0):
    """{'train', 'val', 'test'} -> uint8 [n_classes, 20, 28, 28] ('val' is [0, 20, 28, 28] when val_classes=0)."""
    return {name: data.images[idx] for name, idx in omniglot_split_indices(data, split, seed, val_classes).items()}


def alphabet_of(character: str) -> str:
    """The alphabet of an Omniglot character name ('alphabet/characterNN', as OmniglotData.characters)."""
    return character.split("/", 1)[0]


def omniglot_split_alphabets(data: OmniglotData, split: str = "paper", seed: int = 0, val_classes: int = 0):
    """{'train', 'val', 'test'} -> the alphabet of each class, in the order of `omniglot_split`'s arrays (for
    within-alphabet task samplers)."""
    return {name: [data.alphabets[i] for i in idx]
            for name, idx in omniglot_split_indices(data, split, seed, val_classes).items()}


def split_info(data: OmniglotData, split: str = "paper", seed: int = 0, val_classes: int = 0) -> dict:
    """Compact, JSON-able provenance of a split: its name, seed, class counts and the sha256 of each class list."""
    indices = omniglot_split_indices(data, split, seed, val_classes)
    return {
        "dataset": "omniglot",
        "split": split,
        "seed": int(seed),
        "val_classes": int(val_classes),
        "counts": {name: int(len(idx)) for name, idx in indices.items()},
        "classes_sha256": {
            name: arraycache.sha256_strings(data.characters[i] for i in idx) for name, idx in indices.items()
        },
        "pixels_sha256": hashlib.sha256(np.ascontiguousarray(data.images).tobytes()).hexdigest(),
    }
