"""Does adapting the body too at test time (not only the head) help a Proto-ANIL model at 5 shots? No training.

    PYTHONPATH=. OMP_NUM_THREADS=1 python docs/results/body-finetune/explore.py models/zoo/omniglot-5w5s.pt \
        --body-lrs 0 0.001 0.003 0.01 --tasks 600 > docs/results/body-finetune/run1.log

The served meta-test of the model (`python -m trainer.evaluate CHECKPOINT --ways W --shots K --queries Q`: the same
sampler, seed 1000003, chunks of 100, so the same tasks as its recorded row; its views and step count), once per body
rate: the head starts at the support prototypes and steps at the model's inner lr, every other tensor at the body
rate (per-element rates, as a Meta-SGD model carries them: `trainer.evaluate.evaluate` with `lr` a dict and all
parameters adapted). Body rate 0 is the head-only adaptation the model serves.
"""

from __future__ import annotations

import argparse
import time

import torch

from models.checkpoint import load_checkpoint
from models.functional import HEAD_KEYS
from trainer.evaluate import _omniglot_sampler, evaluate


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("checkpoint")
    p.add_argument("--body-lrs", nargs="+", type=float, default=[0.0, 0.01])
    p.add_argument("--tasks", type=int, default=600)
    p.add_argument("--ways", type=int, default=0)
    p.add_argument("--shots", type=int, default=5)
    p.add_argument("--queries", type=int, default=5)
    p.add_argument("--steps", type=int, default=0)
    a = p.parse_args()
    torch.set_num_threads(1)
    model = load_checkpoint(a.checkpoint)
    spec = model.spec
    steps = a.steps or spec.steps
    for body_lr in a.body_lrs:
        args = argparse.Namespace(split=None, data_root="", ways=a.ways or spec.ways, shots=a.shots,
                                  queries=a.queries, seed=1000003, device="cpu", within_alphabet=False)
        sampler, _ = _omniglot_sampler(args, model, [])
        start = time.time()
        if body_lr == 0:
            res = evaluate(spec, model.params, sampler, a.tasks, steps, spec.inner_lr, 100, adapt_keys=HEAD_KEYS)
        else:
            lrs = {k: torch.full_like(v, spec.inner_lr if k in HEAD_KEYS else body_lr)
                   for k, v in model.params.items()}
            res = evaluate(spec, model.params, sampler, a.tasks, steps, lrs, 100)
        row = "  ".join(f"{pol} " + " ".join(f"{m:.2f}" for m in res[pol]["mean"]) + f" (±{res[pol]['ci95'][-1]:.2f})"
                        for pol in ("transductive", "support"))
        print(f"body lr {body_lr:g}: steps 0..{steps}: {row}  [{time.time() - start:.0f} s]", flush=True)


if __name__ == "__main__":
    main()
