#!/usr/bin/env bash
# Shift augmentation for omniglot-20w1s (README.md here): Proto-ANIL from the bundled 20-way tensors
# (omniglot-20w1s-proto-anil-within, iteration 9,000), half of every meta-batch within one alphabet as that run, and
# every train image moved by a random (dy, dx) in [-2, 2]^2 pixels (--train_shift 2); starts it, or continues it with
# --resume, one core, niced, then meta-tests (random tasks, no views) and copies the results and the model here
# (scripts/long_run.sh). The served meta-test: python -m trainer.evaluate model.pt --support-views cross2
# --query-views cross2 --steps 5 (and --within-alphabet).
#   STOP_AT=08:55 docs/results/omniglot-20w1s-proto-anil-shift/run.sh --cosine_lr true --cosine_start 0 \
#       --iterations 14000 --meta_lr 2e-4 --min_meta_lr 1e-5   # the first session's command
RECIPE=proto-anil exec "$(dirname "$0")/../../../scripts/long_run.sh" omniglot-20w1s \
    docs/results/omniglot-20w1s-proto-anil-shift docs/results/omniglot-20w1s-proto-anil-within/model.pt 08:55 \
    --train_within_alphabet 0.5 --train_shift 2 "$@"
