#!/usr/bin/env bash
# The halfcheetah-vel long run (README.md here): continues it with --resume, one core, niced, then meta-tests the best
# iterate into interim-<iterations>/ (scripts/rl_long_run.sh). Commit docs/results/halfcheetah-vel/ after every stop.
#   docs/results/halfcheetah-vel/run.sh                     # until 21:10 UTC (STOP_AT=HH:MM: its next occurrence)
#   MAX_SECONDS=7200 docs/results/halfcheetah-vel/run.sh    # or: two more hours
exec "$(dirname "$0")/../../../scripts/rl_long_run.sh" halfcheetah-vel 21:10 "$@"
