#!/usr/bin/env bash
# A wider body for omniglot-20w1s (README.md here): the shift-trained Proto-ANIL tensors
# (../omniglot-20w1s-proto-anil-shift/model.pt, iteration 3,000) widened from 64 to 128 filters per layer by
# `python -m models.widen ... --hidden 128 --noise 0.01 --seed 0 --out init.pt` (the same function but for the
# symmetry-breaking noise), then meta-trained as that run (Proto-ANIL, half of every meta-batch within one alphabet,
# --train_shift 2); starts it, or continues it with --resume, one core, niced, then meta-tests (random tasks, no views)
# and copies the results and the model here (scripts/long_run.sh).
#   STOP_AT=15:55 docs/results/omniglot-20w1s-wide/run.sh --cosine_lr true --cosine_start 0 --iterations 7000 \
#       --meta_lr 2e-4 --min_meta_lr 1e-5   # the first session's command
RECIPE=proto-anil exec "$(dirname "$0")/../../../scripts/long_run.sh" omniglot-20w1s \
    docs/results/omniglot-20w1s-wide docs/results/omniglot-20w1s-wide/init.pt 15:55 \
    --hidden 128 --train_within_alphabet 0.5 --train_shift 2 "$@"
