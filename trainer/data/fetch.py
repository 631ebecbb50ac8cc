"""`python -m trainer.data.fetch [DIR]` (`make data`): the official Omniglot archives in DIR, fetched at most once.

DIR defaults to $FASTADAPT_OMNIGLOT, else ../shared/data/omniglot. Nothing happens when DIR already holds both parts
(images_background and images_evaluation, as zips or extracted folders). Otherwise the official
images_{background,evaluation}.zip are downloaded from github.com/brendenlake/omniglot with a progress bar, their md5
checked against the published one, and only then moved into place (trainer.data.omniglot.download_omniglot).
No test calls this: tests never download.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from trainer.data.omniglot import DEFAULT_ROOT, ROOT_ENV, _locate, download_omniglot


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer.data.fetch", description=__doc__.splitlines()[0])
    p.add_argument("dest", nargs="?", type=Path, default=None,
                   help=f"folder for the archives (default ${ROOT_ENV}, else {DEFAULT_ROOT})")
    args = p.parse_args(argv)
    dest = args.dest or Path(os.environ.get(ROOT_ENV) or DEFAULT_ROOT)
    found = _locate(dest)
    if found is not None:
        print(f"Omniglot: found {' and '.join(str(s.path) for s in found)}; nothing to fetch")
        return 0
    print(f"Omniglot: not found in {dest}; downloading the official archives there")
    try:
        download_omniglot(dest)
    except OSError as exc:  # no network (URLError is an OSError), a bad md5, a read-only folder
        print(f"error: fetching Omniglot into {dest} failed: {exc}. Put images_background.zip and "
              f"images_evaluation.zip there yourself, or point ${ROOT_ENV} at a folder that has them.", file=sys.stderr)
        return 1
    print(f"Omniglot: fetched into {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
