#!/usr/bin/env bash
# Hard tasks for omniglot-20w1s (README.md here): Proto-ANIL from the bundled 20-way Proto-ANIL model, half of every
# meta-batch drawn within one alphabet of the train split (--train_within_alphabet 0.5); starts it, or continues it
# with --resume, one core, niced, then meta-tests (random tasks) and copies the results and the model here
# (scripts/long_run.sh). The within-alphabet meta-test: python -m trainer.evaluate model.pt --within-alphabet.
#   STOP_AT=23:55 docs/results/omniglot-20w1s-proto-anil-within/run.sh --cosine_lr true --cosine_start 0 \
#       --iterations 15000 --meta_lr 2e-4 --min_meta_lr 1e-5   # the first session's command
RECIPE=proto-anil exec "$(dirname "$0")/../../../scripts/long_run.sh" omniglot-20w1s \
    docs/results/omniglot-20w1s-proto-anil-within docs/results/omniglot-20w1s-proto-anil/model.pt 23:55 \
    --train_within_alphabet 0.5 "$@"
