#!/usr/bin/env bash
# Prints the seconds from now until the next occurrence of HH:MM UTC (today, or tomorrow once it has passed), less
# MARGIN (default 30), and at least 1, since the trainer reads --max_seconds 0 or less as no limit: the --max_seconds
# of a long run that must have stopped and saved by then. scripts/long_run.sh, scripts/rl_long_run.sh and
# docs/results/omniglot-20w1s-paper/run.sh call it when MAX_SECONDS is not given.
#   scripts/seconds_until.sh 13:40 90
set -euo pipefail
[ $# -ge 1 ] && [ $# -le 2 ] || { echo "usage: $0 HH:MM [MARGIN] (got $# arguments)" >&2; exit 2; }
STOP=$1 MARGIN=${2:-30}
[[ "$STOP" =~ ^([01][0-9]|2[0-3]):[0-5][0-9]$ ]] || { echo "$0: stop time '${STOP:0:40}', expected HH:MM (UTC)" >&2
                                                         exit 2; }
[[ "$MARGIN" =~ ^[0-9]{1,5}$ ]] || { echo "$0: margin '${MARGIN:0:40}', expected whole seconds >= 0" >&2; exit 2; }
NOW=$(date -u +%s); UNTIL=$(date -u -d "$STOP" +%s)
[ "$UNTIL" -gt "$NOW" ] || UNTIL=$(( UNTIL + 86400 ))
LEFT=$(( UNTIL - NOW - MARGIN ))
echo $(( LEFT > 0 ? LEFT : 1 ))
