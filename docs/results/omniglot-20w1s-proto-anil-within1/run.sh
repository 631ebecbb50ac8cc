#!/usr/bin/env bash
# The all-hard arm beside ../omniglot-20w1s-proto-anil-within (README.md there): Proto-ANIL from the bundled 20-way
# Proto-ANIL model with every meta-training task drawn within one alphabet (--train_within_alphabet 1); starts it, or
# continues it with --resume, one core, niced, then meta-tests (random tasks) and copies the results and the model
# here (scripts/long_run.sh).
#   STOP_AT=23:55 docs/results/omniglot-20w1s-proto-anil-within1/run.sh --cosine_lr true --cosine_start 0 \
#       --iterations 15000 --meta_lr 2e-4 --min_meta_lr 1e-5   # the first session's command
RECIPE=proto-anil exec "$(dirname "$0")/../../../scripts/long_run.sh" omniglot-20w1s \
    docs/results/omniglot-20w1s-proto-anil-within1 docs/results/omniglot-20w1s-proto-anil/model.pt 23:55 \
    --train_within_alphabet 1 "$@"
