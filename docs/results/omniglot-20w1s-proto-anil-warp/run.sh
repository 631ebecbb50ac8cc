#!/usr/bin/env bash
# Affine warps in meta-training for omniglot-20w1s (README.md here): Proto-ANIL from the bundled shift-trained tensors
# (../omniglot-20w1s-proto-anil-shift/model.pt, iteration 3,000) as that run (half of every meta-batch within one
# alphabet, --train_shift 2), and every train image also warped by its own rotation in [-10, 10] degrees and a stretch
# of each axis in [0.9, 1.1] (--train_tilt 10 --train_scale 0.1); starts it, or continues it with --resume, one core,
# niced, then meta-tests (random tasks, no views) and copies the results and the model here (scripts/long_run.sh).
# The served meta-test: python -m trainer.evaluate model.pt --support-views cross2 --query-views cross2 --steps 5
# (and --within-alphabet).
#   STOP_AT=18:15 docs/results/omniglot-20w1s-proto-anil-warp/run.sh --cosine_lr true --cosine_start 0 \
#       --iterations 12000 --meta_lr 2e-4 --min_meta_lr 1e-5   # the first session's command
RECIPE=proto-anil exec "$(dirname "$0")/../../../scripts/long_run.sh" omniglot-20w1s \
    docs/results/omniglot-20w1s-proto-anil-warp docs/results/omniglot-20w1s-proto-anil-shift/model.pt 18:15 \
    --train_within_alphabet 0.5 --train_shift 2 --train_tilt 10 --train_scale 0.1 "$@"
