#!/usr/bin/env bash
# Five queries per class in meta-training for omniglot-20w1s (README.md here): Proto-ANIL from the within-alphabet-
# trained bundled 20-way model (../omniglot-20w1s-proto-anil-within/model.pt), half of every meta-batch within one
# alphabet as that run, but 5 query images per class instead of 1 (Snell et al. train with 5); starts it, or continues
# it with --resume, one core, niced, then meta-tests (random tasks, 1 query per class as every row) and copies the
# results and the model here (scripts/long_run.sh).
#   STOP_AT=02:45 docs/results/omniglot-20w1s-proto-anil-q5/run.sh --cosine_lr true --cosine_start 0 \
#       --iterations 6000 --meta_lr 1e-4 --min_meta_lr 1e-5   # the first session's command
RECIPE=proto-anil exec "$(dirname "$0")/../../../scripts/long_run.sh" omniglot-20w1s \
    docs/results/omniglot-20w1s-proto-anil-q5 docs/results/omniglot-20w1s-proto-anil-within/model.pt 02:45 \
    --train_within_alphabet 0.5 --queries 5 "$@"
