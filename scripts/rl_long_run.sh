#!/usr/bin/env bash
# A long MAML-RL run on the CPU that survives a change of machine (the half-cheetah runs: about a minute per
# meta-iteration, 500 of them): starts CONFIG in docs/results/CONFIG, or continues it with --resume when
# docs/results/CONFIG/state/state.pt exists (on any machine with only the repository and `make setup`), one thread,
# `nice -n 10`, without the final evaluation; training stops after MAX_SECONDS, default: until STOP_AT (UTC HH:MM, its
# next occurrence). Then it meta-tests the best iterate into docs/results/CONFIG/interim-<iterations>/ (40 tasks,
# steps 0-3, about half a minute) beside the training curve so far (training.png), and writes the training returns
# per 25 meta-iterations into docs/results/CONFIG/progress.{json,md}. Commit docs/results/CONFIG after every stop.
#   scripts/rl_long_run.sh halfcheetah-vel 21:10
#   MAX_SECONDS=3600 scripts/rl_long_run.sh halfcheetah-dir 00:00
# Arguments after the second are more trainer overrides (`--key value`). To end a run early and keep everything:
# `pkill -TERM -f "trainer CONFIG"` (it stops after the meta-iteration under way and saves its state and policy).
set -euo pipefail
[ $# -ge 2 ] || { echo "usage: $0 CONFIG DEFAULT_STOP_AT [--key value ...] (got $# arguments)" >&2; exit 2; }
CONFIG=$1 DEFAULT_STOP=$2
shift 2
case "$CONFIG" in navigation-2d|halfcheetah-vel|halfcheetah-dir) ;;
    *) echo "$0: CONFIG $CONFIG, expected navigation-2d, halfcheetah-vel or halfcheetah-dir" >&2; exit 2 ;; esac
cd "$(dirname "$0")/.."
RUN=${RUN_DIR:-docs/results/$CONFIG}  # RUN_DIR: elsewhere (the tests)
# until STOP_AT's next occurrence, less 90 s: a meta-iteration may run past the limit
[ -n "${MAX_SECONDS:-}" ] || MAX_SECONDS=$(scripts/seconds_until.sh "${STOP_AT:-$DEFAULT_STOP}" 90)
RESUME=()
[ -f "$RUN/state/state.pt" ] && RESUME=(--resume)
OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 nice -n 10 .venv/bin/python -m trainer "$CONFIG" "${RESUME[@]}" \
    --out_dir "$RUN" --max_seconds "$MAX_SECONDS" --final_eval false --progress false --threads 1 "$@"
ITERS=$(.venv/bin/python -c "import sys, torch; print(torch.load(sys.argv[1], weights_only=True)['iteration'])" \
    "$RUN/state/state.pt")
OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python -m trainer.rl.evaluate "$RUN/policy.pt" --out "$RUN/interim-$ITERS"
.venv/bin/python -c "import sys; from pathlib import Path; from trainer.rl.plots import plot_rl_training
plot_rl_training(Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3]))" \
    "$RUN/state/log.jsonl" "$CONFIG meta-training, $ITERS iterations" "$RUN/interim-$ITERS/training.png"
.venv/bin/python -m trainer.rl.progress "$RUN/state/log.jsonl" --out "$RUN" > /dev/null  # RUN/progress.{json,md}
