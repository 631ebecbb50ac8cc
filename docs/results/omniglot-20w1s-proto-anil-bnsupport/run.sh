#!/usr/bin/env bash
# Train for the served policy (README.md here): Proto-ANIL from the bundled 20-way Proto-ANIL model with the queries
# of meta-training (and validation) normalized by the support set's batch statistics (--bn_policy support, what the
# server does) instead of their own batch's; starts it, or continues it with --resume, one core, niced, then
# meta-tests and copies the results and the model here (scripts/long_run.sh).
#   STOP_AT=23:55 docs/results/omniglot-20w1s-proto-anil-bnsupport/run.sh --cosine_lr true --cosine_start 0 \
#       --iterations 12000 --meta_lr 2e-4 --min_meta_lr 1e-5   # the first session's command
RECIPE=proto-anil exec "$(dirname "$0")/../../../scripts/long_run.sh" omniglot-20w1s \
    docs/results/omniglot-20w1s-proto-anil-bnsupport docs/results/omniglot-20w1s-proto-anil/model.pt 23:55 \
    --bn_policy support "$@"
