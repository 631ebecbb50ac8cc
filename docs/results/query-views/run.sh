#!/usr/bin/env bash
# The bundled Omniglot models meta-tested with query views (models.views, cross2: each query's logits are the mean of
# those of the query and its 1- and 2-pixel shifts), on the tasks of every other row (600, seed 1000003), at each
# model's serving step count; one thread, niced. The 1-shot models adapt on their support views (cross2) as bundled;
# the rows without query views are docs/results/support-views/ (the same tasks, the same adaptations).
set -euo pipefail
cd "$(dirname "$0")/../../.."
OUT=docs/results/query-views
run() {  # model steps [extra args]
    local model=$1 steps=$2; shift 2
    local dir="$OUT/$model${STEPS0:+-steps0}"
    [ "${1:-}" = --within-alphabet ] && dir="$dir-within"
    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 nice -n 5 .venv/bin/python -m trainer.evaluate "models/zoo/$model.pt" \
        --query-views cross2 --steps "$steps" --device cpu --out "$dir" "$@" | tail -n 12
}
run omniglot-20w1s 5
run omniglot-5w1s 3
run omniglot-20w1s 5 --within-alphabet
run omniglot-5w1s 3 --within-alphabet
# 5 shots at 0 steps, as docs/results/support-views/ measured them (the models' own meta-tests change by 0.1 from 0
# to 10 steps)
STEPS0=1 run omniglot-5w5s 0 --shots 5 --queries 5
STEPS0=1 run omniglot-20w5s 0 --shots 5
# the 5-shot models at their serving step count (10), as bundled with query views (2026-12-07, the next session)
run omniglot-5w5s 10 --shots 5 --queries 5
run omniglot-20w5s 10 --shots 5
