#!/usr/bin/env bash
# omniglot-20w1s, Proto-ANIL (the head starts at the support prototypes) from the 20-way ANIL run's best model
# (README.md here): starts it, or continues it with --resume, one core, niced, then meta-tests and copies the results
# and the model here (scripts/long_run.sh).
#   STOP_AT=18:45 docs/results/omniglot-20w1s-proto-anil/run.sh --cosine_lr true --cosine_start 0 --iterations 20000 \
#       --meta_lr 3e-4 --min_meta_lr 1e-5 --val_tasks 400   # the first session's command
RECIPE=proto-anil exec "$(dirname "$0")/../../../scripts/long_run.sh" omniglot-20w1s \
    docs/results/omniglot-20w1s-proto-anil docs/results/omniglot-20w1s-anil/model.pt 18:45 "$@"
