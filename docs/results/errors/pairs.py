"""The character pairs errors.py found confused most often under the transductive policy, drawn side by side
(pairs.png): per row, five drawings of one character, a gap, five of the other.
`python docs/results/errors/pairs.py ERRORS_JSON OUT_PNG [N]` (N pairs, default 8)."""

import collections
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from trainer.data.omniglot import load_omniglot  # noqa: E402

if len(sys.argv) not in (3, 4):
    print("usage: pairs.py ERRORS_JSON OUT_PNG [N]", file=sys.stderr)
    sys.exit(2)
wrong = [w for w in json.load(open(sys.argv[1]))["wrong"] if w["policy"] == "transductive"]
top = collections.Counter(tuple(sorted((w["true"], w["predicted"]))) for w in wrong).most_common(
    int(sys.argv[3]) if len(sys.argv) == 4 else 8)
data = load_omniglot(None)
index = {c: i for i, c in enumerate(data.characters)}
fig, axes = plt.subplots(len(top), 11, figsize=(11 * 0.9, len(top) * 1.0))
for row, ((a, b), n) in enumerate(top):
    for col in range(11):
        ax = axes[row, col]
        ax.axis("off")
        if col == 5:
            ax.text(0.5, 0.5, f"{n}x", ha="center", va="center", fontsize=9)
            continue
        char, k = (a, col) if col < 5 else (b, col - 6)
        ax.imshow(data.images[index[char], k], cmap="gray", vmin=0, vmax=255)
        if k == 0:
            ax.set_title(char.replace("_", " ").replace("/character", " #"), fontsize=6, loc="left")
fig.tight_layout()
fig.savefig(sys.argv[2], dpi=110)
