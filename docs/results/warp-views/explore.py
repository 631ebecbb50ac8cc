"""Do tilted or stretched views help beside the shifted ones (models.views' cross2)? An exploration, no training.

    PYTHONPATH=. OMP_NUM_THREADS=1 python docs/results/warp-views/explore.py models/zoo/omniglot-20w1s.pt \
        --sets cross2 cross2+tilt5 cross2+tilt10 cross2+scale10 > docs/results/warp-views/run1.log

600 tasks of the meta-test's seed (1000003, 1 query per class) drawn 20 at a time (other tasks than the meta-test's
chunks of 100 draw; the same for every set here), 0 steps (the prototypes alone: the bundled model's 5 head steps
change its numbers by less than 0.1). Every support image and every query image is seen in each view of
the set: the prototypes are the mean features of a class's support views, a query's logits the mean of its views'
(as the server does with cross2 support and query views). `support`: the extended support set's batch statistics
(served); `transductive`: the query views' own. A view is a shift by (dy, dx) pixels (edge repeated, as
models.views) and then a warp by (degrees, x stretch, y stretch) (trainer.data.sampler.warped, bilinear).
It reads the checkpoint's tensors only (the spec's own views are not applied).
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from models.checkpoint import load_checkpoint
from models.functional import body_features, head_logits, stack_params, support_stats
from models.maml import prototype_head
from models.views import SUPPORT_VIEWS, shifted
from trainer.data.sampler import warped
from trainer.evaluate import _omniglot_sampler

CROSS2 = [(dy, dx, 0.0, 1.0, 1.0) for dy, dx in SUPPORT_VIEWS["cross2"]]
SETS = {
    "none": [(0, 0, 0.0, 1.0, 1.0)],
    "cross2": CROSS2,
    "cross2+tilt5": CROSS2 + [(0, 0, d, 1.0, 1.0) for d in (5.0, -5.0)],
    "cross2+tilt10": CROSS2 + [(0, 0, d, 1.0, 1.0) for d in (10.0, -10.0)],
    "cross2+tilt5x2": CROSS2 + [(0, 0, d, 1.0, 1.0) for d in (5.0, -5.0, 10.0, -10.0)],
    "cross2+scale10": CROSS2 + [(0, 0, 0.0, sx, sy) for sx, sy in ((1.1, 1.0), (0.9, 1.0), (1.0, 1.1), (1.0, 0.9))],
}


def views(x: torch.Tensor, spec_views) -> torch.Tensor:
    """x [T, S, C, H, W] -> [T, S * V, C, H, W], view v of row s at s * V + v."""
    flat, out = x.flatten(0, 1), []
    for dy, dx, degrees, sx, sy in spec_views:
        v = shifted(flat, dy, dx) if (dy or dx) else flat
        if degrees or sx != 1.0 or sy != 1.0:
            m = v.shape[0]
            v = warped(v, torch.full((m,), degrees), torch.full((m,), sx), torch.full((m,), sy))
        out.append(v.reshape(x.shape))
    return torch.stack(out, 2).flatten(1, 2)


def accuracy(spec, params, sx, sy, qx, qy, n_views, stats) -> torch.Tensor:
    head = prototype_head(body_features(spec, params, sx, stats=stats), sy, spec.ways)
    logits = head_logits(head, body_features(spec, params, qx, stats=stats))
    logits = logits.reshape(logits.shape[0], -1, n_views, logits.shape[-1]).mean(2)
    return (logits.argmax(-1) == qy).float().mean(1) * 100


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("checkpoint")
    p.add_argument("--sets", nargs="+", default=["cross2", "cross2+tilt5"], choices=tuple(SETS))
    p.add_argument("--tasks", type=int, default=600)
    p.add_argument("--within-alphabet", action="store_true")
    a = p.parse_args()
    torch.set_num_threads(1)
    model = load_checkpoint(a.checkpoint)
    spec = model.spec
    args = argparse.Namespace(split=None, data_root="", ways=spec.ways, shots=1, queries=1, seed=1000003,
                              device="cpu", within_alphabet=a.within_alphabet)
    sampler, _ = _omniglot_sampler(args, model, [])
    got: dict[str, list] = {}
    start = time.time()
    with torch.no_grad():
        for done in range(0, a.tasks, 20):
            b = sampler.sample(min(20, a.tasks - done))
            params = stack_params(model.params, b.support_x.shape[0])
            for name in a.sets:
                vs = SETS[name]
                sx, qx = views(b.support_x, vs), views(b.query_x, vs)
                sy = b.support_y.repeat_interleave(len(vs), 1)
                stats = support_stats(spec, params, sx)
                for policy, st in (("support", stats), ("transductive", None)):
                    got.setdefault(f"{name}/{policy}", []).append(
                        accuracy(spec, params, sx, sy, qx, b.query_y, len(vs), st))
    for key, values in got.items():
        v = torch.cat(values)
        print(f"{key:26s} {v.mean():.2f} ± {1.96 * v.std(unbiased=False) / math.sqrt(len(v)):.2f}")
    print(f"{time.time() - start:.0f} s, {a.tasks} tasks, {'within one alphabet' if a.within_alphabet else 'random'}")


if __name__ == "__main__":
    main()
