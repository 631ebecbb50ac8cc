#!/usr/bin/env bash
# The bundled Omniglot models meta-tested with support views (models.views, cross2: every support image and its 1- and
# 2-pixel shifts), on the tasks of every other row (600, seed 1000003), at each model's serving step count; one
# thread, niced. The rows without views are the models' own recorded meta-tests (the same tasks).
set -euo pipefail
cd "$(dirname "$0")/../../.."
OUT=docs/results/support-views
run() {  # model steps [extra args]
    local model=$1 steps=$2; shift 2
    local dir="$OUT/$model${STEPS0:+-steps0}"
    [ "${1:-}" = --within-alphabet ] && dir="$dir-within"
    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 nice -n 5 .venv/bin/python -m trainer.evaluate "models/zoo/$model.pt" \
        --support-views cross2 --steps "$steps" --device cpu --out "$dir" "$@" | tail -n 12
}
run omniglot-20w1s 5
run omniglot-5w1s 3
run omniglot-20w1s 5 --within-alphabet
run omniglot-5w1s 3 --within-alphabet
# 5 shots at 0 steps: the prototypes alone (9 x 100 support rows per 20-way task make every recorded step a forward
# of 900 rows; the models' own meta-tests change by 0.1 from 0 to 10 steps)
STEPS0=1 run omniglot-5w5s 0 --shots 5 --queries 5
STEPS0=1 run omniglot-20w5s 0 --shots 5
