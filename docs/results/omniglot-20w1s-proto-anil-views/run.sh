#!/usr/bin/env bash
# Support views in meta-training for omniglot-20w1s (README.md here): Proto-ANIL from the within-alphabet-trained
# 20-way model (../omniglot-20w1s-proto-anil-within/model.pt, the bundled tensors), half of every meta-batch within one
# alphabet as that run, the inner loop adapting on every support image's 9 views (--support_views cross2, as the
# bundled model is served); starts it, or continues it with --resume, one core, niced, then meta-tests (with the
# views, which the checkpoint's spec carries) and copies the results and the model here (scripts/long_run.sh).
#   STOP_AT=02:45 docs/results/omniglot-20w1s-proto-anil-views/run.sh --cosine_lr true --cosine_start 0 \
#       --iterations 2000 --meta_lr 1e-4 --min_meta_lr 1e-5 --eval_steps 5   # the first session's command
RECIPE=proto-anil exec "$(dirname "$0")/../../../scripts/long_run.sh" omniglot-20w1s \
    docs/results/omniglot-20w1s-proto-anil-views docs/results/omniglot-20w1s-proto-anil-within/model.pt 02:55 \
    --train_within_alphabet 0.5 --support_views cross2 "$@"
