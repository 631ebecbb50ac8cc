import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

# Without CUDA, Triton kernels run under its interpreter (set before triton is imported anywhere).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# One thread: on a 2-core box shared with other processes, 2 threads make tiny ops 5-10x slower.
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def omniglot_root() -> Path:
    root = Path(os.environ.get("FASTADAPT_OMNIGLOT", ROOT.parent / "shared" / "data" / "omniglot"))
    if not (root / "images_background.zip").exists() and not (root / "images_background").exists():
        pytest.fail(f"Omniglot not found at {root}: set FASTADAPT_OMNIGLOT")
    return root
