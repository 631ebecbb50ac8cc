#!/usr/bin/env bash
# The paper's 20-way 1-shot reproduction with MAML proper (second order, paper split 1,200 / 423 characters, 5 steps
# at lr 0.1, meta-batch 16, Adam 1e-3, 60,000 iterations) on the CPU, one thread, `nice -n 10`, resumable across
# machines: the run folder is this directory (state.pt, log.jsonl, best.pt are committed; last.pt is removed when a
# session stops). Starts it, or continues it with --resume when state.pt is here; stops at STOP_AT (UTC HH:MM) or
# after MAX_SECONDS, then meta-tests best.pt (600 tasks) into results.{json,md}.
#   STOP_AT=13:40 docs/results/omniglot-20w1s-paper/run.sh
# On a GPU: scripts/gpu_train.sh with RESUME_FROM=docs/results TP20=<seconds> continues this folder (its run name is
# omniglot-20w1s-paper).
set -euo pipefail
cd "$(dirname "$0")/../../.."
RUN=docs/results/omniglot-20w1s-paper
[ -n "${MAX_SECONDS:-}" ] || MAX_SECONDS=$(scripts/seconds_until.sh "${STOP_AT:?STOP_AT=HH:MM or MAX_SECONDS=N}")
RESUME=()
[ -f "$RUN/state.pt" ] && RESUME=(--resume)
OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 nice -n 10 .venv/bin/python -m trainer omniglot-20w1s "${RESUME[@]}" \
    --split paper --iterations 60000 --device cpu --out_dir "$RUN" --max_seconds "$MAX_SECONDS" --log_every 100 \
    --val_every 1000 --checkpoint_every 500 --checkpoint_seconds 300 --progress false "$@"
rm -f "$RUN/last.pt"
