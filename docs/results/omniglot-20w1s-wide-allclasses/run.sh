#!/usr/bin/env bash
# The wider body on all characters for omniglot-20w1s (README.md here): the 128-filter Proto-ANIL tensors
# (../omniglot-20w1s-wide/model.pt, iteration 3,000 of that run, the best validation) meta-trained on as that run
# (Proto-ANIL, half of every meta-batch within one alphabet, --train_shift 2), but with the 100 background characters
# the other runs hold out for validation in the train split too (--val_classes 0: 964 train characters, no
# validation, the last checkpoint is the model, as ../omniglot-20w1s-proto-anil-allclasses/); starts it, or continues
# it with --resume, one core, niced, then meta-tests (random tasks, no views) and copies the results and the model
# here (scripts/long_run.sh).
#   STOP_AT=00:45 docs/results/omniglot-20w1s-wide-allclasses/run.sh --cosine_lr true --cosine_start 0 \
#       --iterations 6000 --meta_lr 2e-4 --min_meta_lr 1e-5   # the first session's command
RECIPE=proto-anil exec "$(dirname "$0")/../../../scripts/long_run.sh" omniglot-20w1s \
    docs/results/omniglot-20w1s-wide-allclasses docs/results/omniglot-20w1s-wide/model.pt 00:45 \
    --hidden 128 --train_within_alphabet 0.5 --train_shift 2 --val_classes 0 "$@"
