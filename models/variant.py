"""`python -m models.variant SOURCE --name NAME --out DEST [--steps S] [--inner-lr LR] [--bn-policy P]
[--head-init meta|proto] [--ways N] [--support-views V] [--query-views V] [--note TEXT]`

A served variant of a checkpoint: the same tensors (parameters, learned rates, per-step batch-norm weights and
statistics) under another name and other serving defaults (inner steps, inner lr, batch-norm policy). The server
serves any support-set size a model's ways allow, so a 20-way model trained with 1 shot answers 5-shot tasks too; a
variant gives that use its own name and the step count its meta-test recommends (`omniglot-20w5s` from the 20-way
ANIL model: docs/results/omniglot-20w5s/). The provenance keeps the source's and adds `variant_of` (the source's
path, name, serving defaults and training iterations) and the note, so a variant is never mistaken for a model
trained for its own setting. `--head-init proto` serves an ANIL model's body with its head started from the support
prototypes (Proto-MAML) instead of the meta-learned head (docs/results/omniglot-20w1s-proto/). `--ways N` (fewer
than the source's, prototype head only) serves the body for N-way tasks: a prototype head never reads the meta-learned
head's rows, so a body meta-trained on 20-way tasks answers 5-way ones (docs/results/omniglot-5w1s-from-20w/).
`--support-views cross2` adapts on every support image and its 1- and 2-pixel shifts (models.views;
docs/results/support-views/); `--query-views cross2` predicts every query as the mean logits of the query and its
shifts (docs/results/query-views/).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys

from models.checkpoint import CheckpointError, MetaModel, load_checkpoint, save_checkpoint
from models.functional import HEAD_KEYS
from models.spec import BN_POLICIES, HEAD_INITS, SUPPORT_VIEWS

__all__ = ["main", "variant"]


def variant(model: MetaModel, source: str, name: str, steps: int | None = None, inner_lr: float | None = None,
            bn_policy: str | None = None, note: str = "", head_init: str | None = None,
            ways: int | None = None, support_views: str | None = None,
            query_views: str | None = None) -> MetaModel:
    """`model` renamed, with the serving defaults given (None: the source's) and the provenance saying so. `ways`
    (fewer than the source's; the variant's head must start at the prototypes) keeps the head tensors' first rows."""
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"name {name!r}: expected a model name (a file name without '/', not starting with '.')")
    if steps is not None and steps < 0:
        raise ValueError(f"steps {steps}: expected >= 0 inner steps")
    if inner_lr is not None and not (math.isfinite(inner_lr) and inner_lr > 0):
        raise ValueError(f"inner_lr {inner_lr}: expected a finite rate > 0")
    if bn_policy is not None and bn_policy not in BN_POLICIES:
        raise ValueError(f"bn_policy {bn_policy!r}: expected one of {list(BN_POLICIES)}")
    if head_init is not None and head_init not in HEAD_INITS:
        raise ValueError(f"head_init {head_init!r}: expected one of {list(HEAD_INITS)}")
    for field, views in (("support_views", support_views), ("query_views", query_views)):
        if views is not None and views not in SUPPORT_VIEWS:
            raise ValueError(f"{field} {views!r}: expected one of {list(SUPPORT_VIEWS)}")
    old = model.spec
    changes = {"name": name}
    options = (("steps", steps), ("inner_lr", inner_lr), ("bn_policy", bn_policy), ("head_init", head_init),
               ("ways", ways), ("support_views", support_views), ("query_views", query_views))
    changes.update({k: v for k, v in options if v is not None})
    spec = old.with_(**changes)
    tensors = {}
    if ways is not None and ways != old.ways:
        if not 2 <= ways < old.ways:
            raise ValueError(f"ways {ways}: expected 2..{old.ways} (model {old.name} is {old.ways}-way; a variant "
                             "keeps rows of its head, it cannot add classes)")
        if spec.head_init != "proto":
            raise ValueError(f"ways {ways} with head_init {spec.head_init!r}: expected head_init 'proto' (only a "
                             "head started at the support prototypes leaves the meta-learned head's rows unused)")
        # the head's first rows, cloned (a saved view would carry the whole storage); Meta-SGD's per-element rates
        # have the head's shape too
        tensors = {field: {k: v[:ways].clone() if k in HEAD_KEYS else v for k, v in getattr(model, field).items()}
                   for field in ("params", "inner_lrs") if getattr(model, field) is not None}
    provenance = dict(model.provenance)
    provenance["variant_of"] = {"path": source, "name": old.name, "steps": old.steps, "inner_lr": old.inner_lr,
                                "bn_policy": old.bn_policy, "head_init": old.head_init, "ways": old.ways,
                                "support_views": old.support_views, "query_views": old.query_views,
                                "iterations": model.provenance.get("iterations"),
                                "commit": model.provenance.get("commit"), "note": note}
    # every tensor field of the source (the head's first `ways` rows for fewer ways)
    return dataclasses.replace(model, spec=spec, provenance=provenance, **tensors)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models.variant", description=__doc__.split("\n\n")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="a models/checkpoint.py file")
    parser.add_argument("--name", required=True, help="the variant's model name (what clients ask for)")
    parser.add_argument("--out", required=True, help="the file to write (e.g. models/zoo/NAME.pt)")
    parser.add_argument("--steps", type=int, help="default inner steps (default: the source's)")
    parser.add_argument("--inner-lr", type=float, help="default inner lr (default: the source's)")
    parser.add_argument("--bn-policy", help=f"serving batch-norm policy, one of {list(BN_POLICIES)}")
    parser.add_argument("--head-init", help=f"how adapt starts the head, one of {list(HEAD_INITS)} (proto: the "
                        "support prototypes; needs an ANIL model)")
    parser.add_argument("--ways", type=int, help="serve N-way tasks, fewer than the source's ways (needs the "
                        "prototype head: --head-init proto or a proto source)")
    parser.add_argument("--support-views", help=f"views of every support image adapt sees, one of "
                        f"{list(SUPPORT_VIEWS)} (models.views)")
    parser.add_argument("--query-views", help=f"views of every query image predict averages its logits over, one "
                        f"of {list(SUPPORT_VIEWS)} (models.views)")
    parser.add_argument("--note", default="", help="why the variant exists (kept in its provenance)")
    args = parser.parse_args(argv)
    try:
        model = load_checkpoint(args.source)
        out = variant(model, args.source, args.name, args.steps, args.inner_lr, args.bn_policy, args.note,
                      args.head_init, args.ways, args.support_views, args.query_views)
    except (CheckpointError, ValueError) as exc:
        parser.error(str(exc)[:500])
    path = save_checkpoint(args.out, out)
    print(f"wrote {path}: {out.spec.name} ({out.spec.ways}-way, {out.spec.steps} steps at lr {out.spec.inner_lr}, "
          f"bn_policy {out.spec.bn_policy}, head_init {out.spec.head_init}, support views {out.spec.support_views}, "
          f"query views {out.spec.query_views}), "
          f"the tensors of {args.source}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
