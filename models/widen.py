"""`python -m models.widen SOURCE --hidden H --out DEST [--noise SIGMA] [--seed S] [--note TEXT]`

A conv4 checkpoint with H filters per layer instead of h, computing the same function (Net2WiderNet, Chen, Goodfellow
& Shlens 2016), so that meta-training a wider body starts where the narrow one stands instead of from scratch.

New channel j of every layer copies old channel j mod h (its filter, bias, batch-norm gamma / beta, per-step
batch-norm weights and running statistics); a layer's input weights from the n_c copies of channel c are divided
by n_c, so the next layer's pre-activations, and with them its batch statistics under every policy, are unchanged.
The last layer's features feed the head: its copies of channel c are scaled by 1 / sqrt(n_c) (gamma and beta; the
ReLU and max-pool commute with a positive scale) and the head's columns likewise, so a meta-learned head's logits
and a prototype head's squared distances (so its logits, and each of its SGD steps) are those of the source.

Copies get identical gradients, so meta-training would keep them equal: `--noise SIGMA` adds Gaussian noise of
SIGMA times each tensor's standard deviation to the copies' filters (not to the originals), breaking the symmetry
at a small cost in function (docs/results/omniglot-20w1s-wide/). Per-element Meta-SGD rates have no copy rule and
are refused.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys

import torch

from models.checkpoint import CheckpointError, MetaModel, load_checkpoint, save_checkpoint
from models.functional import conv4_miniimagenet_side

__all__ = ["main", "widen"]

CONV_ARCHS = ("conv4-omniglot", "conv4-miniimagenet")


def widen(model: MetaModel, hidden: int, *, noise: float = 0.0, seed: int = 0, source: str = "",
          note: str = "") -> MetaModel:
    """`model` with `hidden` filters per conv layer (>= its own), the same function at noise 0."""
    spec = model.spec
    if spec.arch not in CONV_ARCHS:
        raise ValueError(f"arch {spec.arch!r}: expected one of {list(CONV_ARCHS)} (widening copies conv filters)")
    h = spec.hidden
    if not isinstance(hidden, int) or hidden < h or hidden > 4096:
        raise ValueError(f"hidden {hidden!r}: expected an integer filter count in [{h}, 4096] (model {spec.name} "
                         f"has {h})")
    if not (math.isfinite(noise) and noise >= 0):
        raise ValueError(f"noise {noise!r}: expected a finite standard deviation >= 0 (relative to each tensor's)")
    if model.inner_lrs is not None:
        raise ValueError(f"model {spec.name} has per-element Meta-SGD rates (inner_lrs): expected a model without "
                         "them (a copied weight's rate has no function-preserving rule)")
    src = torch.arange(hidden) % h  # new channel j copies old channel j mod h
    copies = torch.bincount(src, minlength=h).to(torch.float32)  # n_c
    share = 1.0 / copies[src]  # a copy's share of the next layer's input weights
    last_scale = share.sqrt()  # the last layer's features and the head's columns
    g = torch.Generator().manual_seed(seed)
    fresh = torch.arange(hidden) >= h  # the copies noise may touch; the first h channels are the originals
    # the batch norm after the last conv layer, whose features feed the head (bn3 for both conv4 architectures)
    last_bn = f"bn{max(int(n.split('.')[0][4:]) for n in model.params if n.startswith('conv'))}"

    params = {}
    for name, t in model.params.items():
        t = t.detach().to(torch.float32)
        layer = name.split(".")[0]
        if name.startswith("conv"):
            i = int(layer[4:])
            w = t[src]  # out channels
            if name.endswith(".weight"):
                if i > 0:
                    w = w[:, src] * share.view(1, -1, 1, 1)
                if noise > 0 and fresh.any():
                    w = w.clone()
                    w[fresh] += noise * t.std() * torch.randn(w[fresh].shape, generator=g)
            params[name] = w.contiguous()
        elif name.startswith("bn"):
            w = t[src]
            params[name] = (w * last_scale if layer == last_bn else w).contiguous()
        elif name == "head.weight":
            if spec.arch == "conv4-omniglot":
                params[name] = (t[:, src] * last_scale).contiguous()
            else:  # features are [C, side, side] flattened channel-major
                side2 = conv4_miniimagenet_side(spec.input_shape[1]) ** 2
                w = t.reshape(t.shape[0], h, side2)[:, src] * last_scale.view(1, -1, 1)
                params[name] = w.reshape(t.shape[0], hidden * side2).contiguous()
        else:  # head.bias
            params[name] = t.clone()

    def per_step(d, scale_last):
        if d is None:
            return None
        out = {}
        for k, v in d.items():  # [S, C]
            w = v.detach().to(torch.float32)[:, src]
            out[k] = (w * last_scale if scale_last and k.startswith(last_bn + ".") else w).contiguous()
        return out

    provenance = dict(model.provenance)
    provenance["widened_from"] = {"path": source, "name": spec.name, "hidden": h, "to": hidden, "noise": noise,
                                  "seed": seed, "iterations": model.provenance.get("iterations"),
                                  "commit": model.provenance.get("commit"), "note": note}
    return dataclasses.replace(model, spec=spec.with_(hidden=hidden), params=params,
                               step_bn=per_step(model.step_bn, True),
                               bn_running=per_step(model.bn_running, False), provenance=provenance)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models.widen", description=__doc__.split("\n\n")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="a conv4 models/checkpoint.py file")
    parser.add_argument("--hidden", type=int, required=True, help="filters per conv layer (>= the source's)")
    parser.add_argument("--out", required=True, help="the file to write")
    parser.add_argument("--noise", type=float, default=0.0, help="noise on the copies' filters, relative to each "
                        "tensor's standard deviation (default 0: the same function)")
    parser.add_argument("--seed", type=int, default=0, help="the noise's seed")
    parser.add_argument("--note", default="", help="why (kept in the provenance)")
    args = parser.parse_args(argv)
    try:
        model = load_checkpoint(args.source)
        out = widen(model, args.hidden, noise=args.noise, seed=args.seed, source=args.source, note=args.note)
    except (CheckpointError, ValueError) as exc:
        parser.error(str(exc)[:500])
    path = save_checkpoint(args.out, out)
    print(f"wrote {path}: {out.spec.name}, {model.spec.hidden} -> {out.spec.hidden} filters, noise {args.noise}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
