#!/usr/bin/env bash
# The paper's pretrained baseline for halfcheetah-vel (README.md here): the same TRPO step on the pre-update
# trajectories, no inner step. Continues with --resume, one core, niced, then meta-tests the best iterate into
# interim-<iterations>/ (scripts/rl_long_run.sh). Commit docs/results/halfcheetah-vel-pretrained/ after every stop.
#   STOP_AT=08:25 docs/results/halfcheetah-vel-pretrained/run.sh
#   MAX_SECONDS=7200 docs/results/halfcheetah-vel-pretrained/run.sh
RUN_DIR=docs/results/halfcheetah-vel-pretrained \
    exec "$(dirname "$0")/../../../scripts/rl_long_run.sh" halfcheetah-vel 08:25 --algorithm pretrained "$@"
