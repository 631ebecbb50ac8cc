#!/usr/bin/env bash
# 5-shot meta-training for the 5-shot models (README.md here): Proto-ANIL on 20-way 5-shot tasks (1 query per class, as
# the 5-shot rows are meta-tested at 20-way) from the bundled 20-way 1-shot tensors
# (omniglot-20w1s-proto-anil-shift, iteration 3,000), half of every meta-batch within one alphabet and every train
# image shifted by up to 2 pixels as that run; starts it, or continues it with --resume, one core, niced, then
# meta-tests (random 20-way 5-shot tasks, no views) and copies the results and the model here (scripts/long_run.sh).
#   STOP_AT=13:15 docs/results/omniglot-20w5s-proto-anil-shift/run.sh --cosine_lr true --cosine_start 0 \
#       --iterations 3000 --meta_lr 2e-4 --min_meta_lr 1e-5   # the first session's command
RECIPE=proto-anil exec "$(dirname "$0")/../../../scripts/long_run.sh" omniglot-20w5s \
    docs/results/omniglot-20w5s-proto-anil-shift docs/results/omniglot-20w1s-proto-anil-shift/model.pt 13:15 \
    --queries 1 --eval_queries 1 --train_within_alphabet 0.5 --train_shift 2 "$@"
