#!/usr/bin/env bash
# Higher-way training for omniglot-20w1s (README.md here): Proto-ANIL on 40-way 1-shot tasks (meta-batch 8, so as
# many images per iteration as the 20-way run's 16 tasks) from the bundled 20-way Proto-ANIL model; starts it, or
# continues it with --resume, one core, niced, then meta-tests (40-way) and copies the results and the model here
# (scripts/long_run.sh). Served at 20-way by `python -m models.variant ... --ways 20`.
#   STOP_AT=00:25 docs/results/omniglot-20w1s-proto-anil-40w/run.sh --cosine_lr true --cosine_start 0 \
#       --iterations 15000 --meta_lr 2e-4 --min_meta_lr 1e-5   # the first session's command
RECIPE=proto-anil exec "$(dirname "$0")/../../../scripts/long_run.sh" omniglot-20w1s \
    docs/results/omniglot-20w1s-proto-anil-40w docs/results/omniglot-20w1s-proto-anil/model.pt 00:25 \
    --name omniglot-40w1s --ways 40 --meta_batch 8 "$@"
