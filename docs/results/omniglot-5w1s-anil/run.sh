#!/usr/bin/env bash
# The omniglot-5w1s ANIL long run (background split; README.md here): starts it, or continues it with --resume, one core,
# niced, then meta-tests and copies the results and the model here (scripts/long_run.sh).
#   docs/results/omniglot-5w1s-anil/run.sh                      # until 00:25 UTC (STOP_AT=HH:MM: its next occurrence)
#   MAX_SECONDS=7200 docs/results/omniglot-5w1s-anil/run.sh     # or: two more hours
exec "$(dirname "$0")/../../../scripts/long_run.sh" omniglot-5w1s docs/results/omniglot-5w1s-anil models/zoo/omniglot-5w1s.pt 00:25 "$@"
