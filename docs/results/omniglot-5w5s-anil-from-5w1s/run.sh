#!/usr/bin/env bash
# omniglot-5w5s, ANIL at 5 shots, started from the bundled 5-way 1-shot ANIL model (README.md here): starts it, or
# continues it with --resume, one core, niced, then meta-tests and copies the results and the model here
# (scripts/long_run.sh).
#   STOP_AT=14:55 docs/results/omniglot-5w5s-anil-from-5w1s/run.sh --cosine_lr true --cosine_start 0 --iterations 6000 --inner_steps 3 \
#       --meta_lr 3e-4 --min_meta_lr 1e-5 --val_tasks 400 --val_every 500   # the first session's command
exec "$(dirname "$0")/../../../scripts/long_run.sh" omniglot-5w5s docs/results/omniglot-5w5s-anil-from-5w1s \
    models/zoo/omniglot-5w1s.pt 14:55 "$@"
