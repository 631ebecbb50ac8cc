#!/usr/bin/env bash
# The omniglot-20w1s ANIL long run (background split; README.md here): starts it, or continues it with --resume, one core,
# niced, then meta-tests and copies the results and the model here (scripts/long_run.sh).
#   docs/results/omniglot-20w1s-anil/run.sh                      # until 21:50 UTC (STOP_AT=HH:MM: its next occurrence)
#   MAX_SECONDS=7200 docs/results/omniglot-20w1s-anil/run.sh     # or: two more hours
#   ... run.sh --cosine_lr true --cosine_start 23100 --iterations 40000   # more trainer overrides
exec "$(dirname "$0")/../../../scripts/long_run.sh" omniglot-20w1s docs/results/omniglot-20w1s-anil models/zoo/omniglot-20w1s.pt 21:50 "$@"
