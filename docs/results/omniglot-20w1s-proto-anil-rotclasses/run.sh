#!/usr/bin/env bash
# Rotations as classes for omniglot-20w1s (README.md here): Proto-ANIL from the bundled 20-way Proto-ANIL model with
# each of a character's four rotations a class of its own in meta-training (--rotation_classes true: 4 x 864 classes,
# as Vinyals et al. 2016 / Snell et al. 2017); starts it, or continues it with --resume, one core, niced, then
# meta-tests and copies the results and the model here (scripts/long_run.sh).
#   STOP_AT=23:55 docs/results/omniglot-20w1s-proto-anil-rotclasses/run.sh --cosine_lr true --cosine_start 0 \
#       --iterations 12000 --meta_lr 2e-4 --min_meta_lr 1e-5   # the first session's command
RECIPE=proto-anil exec "$(dirname "$0")/../../../scripts/long_run.sh" omniglot-20w1s \
    docs/results/omniglot-20w1s-proto-anil-rotclasses docs/results/omniglot-20w1s-proto-anil/model.pt 23:55 \
    --rotation_classes true "$@"
