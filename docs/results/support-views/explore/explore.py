"""Which shifted views of the support images help a Proto-ANIL model (the exploration behind models.views).

    PYTHONPATH=. OMP_NUM_THREADS=1 python docs/results/support-views/explore/explore.py models/zoo/omniglot-20w1s.pt \
        --sets plus1 plus2 diag1 --fill constant        # run1-constant-fill.log (with the "none" rows)
    ... --sets plus2 cross3 grid2 grid2s --fill replicate  # run2-replicate.log

The meta-test's 600 tasks (seed 1000003, 1 query per class), 0 steps (the prototypes alone: the bundled models' steps
change nothing). Per view set: the `support` policy (statistics of the extended support set, as served) and
`transductive` (the query batch's own statistics), both with the prototypes of the extended set. `--fill constant`
pads the shifted border with the batch's mean corner pixel, `replicate` repeats the edge (what models.views does).
It reads the checkpoint's tensors only (a spec's own support_views are not applied). The logs here came from an
earlier form of this script (rows named "protoaug" for support), run on the bundled model before it carried views.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F

from models.checkpoint import load_checkpoint
from models.functional import body_features, head_logits, stack_params, support_stats
from models.maml import prototype_head
from trainer.evaluate import _omniglot_sampler

SETS = {
    "none": [(0, 0)],
    "plus1": [(0, 0), (1, 0), (-1, 0), (0, 1), (0, -1)],
    "plus2": [(0, 0), (1, 0), (-1, 0), (0, 1), (0, -1), (2, 0), (-2, 0), (0, 2), (0, -2)],
    "diag1": [(0, 0), (1, 1), (1, -1), (-1, 1), (-1, -1)],
    "cross3": [(0, 0)] + [(d * s, 0) for d in (1, 2, 3) for s in (1, -1)] + [(0, d * s) for d in (1, 2, 3)
                                                                              for s in (1, -1)],
    "grid2": [(a, b) for a in (-2, -1, 0, 1, 2) for b in (-2, -1, 0, 1, 2)],
    "grid2s": [(a, b) for a in (-2, 0, 2) for b in (-2, 0, 2)],
}


def views(x: torch.Tensor, offsets, fill: str) -> torch.Tensor:
    """x [T, S, C, H, W] -> [T, S * V, C, H, W], view v of row s at s * V + v."""
    pad, (h, w) = 3, x.shape[-2:]
    flat = x.flatten(0, 1)
    if fill == "constant":
        padded = F.pad(flat, (pad,) * 4, value=float(flat[..., 0, 0].mean()))
    else:
        padded = F.pad(flat, (pad,) * 4, mode="replicate")
    out = [padded[..., pad - dy: pad - dy + h, pad - dx: pad - dx + w].reshape(x.shape) for dy, dx in offsets]
    return torch.stack(out, 2).flatten(1, 2)


def accuracy(spec, params, sx, sy, qx, qy, stats) -> torch.Tensor:
    head = prototype_head(body_features(spec, params, sx, stats=stats), sy, spec.ways)
    logits = head_logits(head, body_features(spec, params, qx, stats=stats))
    return (logits.argmax(-1) == qy).float().mean(1) * 100


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("checkpoint")
    p.add_argument("--sets", nargs="+", default=["none", "plus2"], choices=tuple(SETS))
    p.add_argument("--fill", choices=("constant", "replicate"), default="replicate")
    p.add_argument("--tasks", type=int, default=600)
    a = p.parse_args()
    torch.set_num_threads(1)
    model = load_checkpoint(a.checkpoint)
    spec = model.spec
    args = argparse.Namespace(split=None, data_root="", ways=spec.ways, shots=1, queries=1, seed=1000003,
                              device="cpu", within_alphabet=False)
    sampler, _ = _omniglot_sampler(args, model, [])
    got: dict[str, list] = {}
    start = time.time()
    with torch.no_grad():
        for done in range(0, a.tasks, 100):
            b = sampler.sample(min(100, a.tasks - done))
            params = stack_params(model.params, b.support_x.shape[0])
            for name in a.sets:
                offsets = SETS[name]
                sx = views(b.support_x, offsets, a.fill)
                sy = b.support_y.repeat_interleave(len(offsets), 1)
                stats = support_stats(spec, params, sx)
                got.setdefault(f"{name}/support", []).append(accuracy(spec, params, sx, sy, b.query_x, b.query_y,
                                                                      stats))
                got.setdefault(f"{name}/transductive", []).append(accuracy(spec, params, sx, sy, b.query_x,
                                                                           b.query_y, None))
    for key, values in got.items():
        v = torch.cat(values)
        print(f"{key:22s} {v.mean():.2f} ± {1.96 * v.std(unbiased=False) / math.sqrt(len(v)):.2f}")
    print(f"{time.time() - start:.0f} s, fill {a.fill}")


if __name__ == "__main__":
    main()
