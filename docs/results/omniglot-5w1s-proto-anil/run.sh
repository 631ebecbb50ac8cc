#!/usr/bin/env bash
# omniglot-5w1s, Proto-ANIL (the head starts at the support prototypes) from the 5-way ANIL run's model (README.md
# here): starts it, or continues it with --resume, one core, niced, then meta-tests and copies the results and the
# model here (scripts/long_run.sh).
#   STOP_AT=18:40 docs/results/omniglot-5w1s-proto-anil/run.sh --cosine_lr true --cosine_start 0 --iterations 8000 \
#       --meta_lr 3e-4 --min_meta_lr 1e-5 --val_tasks 400 --val_every 500   # the first session's command
RECIPE=proto-anil exec "$(dirname "$0")/../../../scripts/long_run.sh" omniglot-5w1s \
    docs/results/omniglot-5w1s-proto-anil docs/results/omniglot-5w1s-anil/model.pt 18:40 "$@"
