#!/usr/bin/env bash
# The served meta-test of this run's model.pt, as the bundled omniglot-20w1s is served (support and query views
# cross2, 5 steps, head from the support prototypes), on the 600 tasks of every other row (seed 1000003): random
# tasks and tasks within one alphabet, into served/. THREADS (default 1) per evaluation; the two run one after the
# other, or side by side with PARALLEL=1. RUN (default this folder) names another run folder with a 128-filter model.pt
# (../omniglot-20w1s-wide-allclasses/evaluate.sh).
set -euo pipefail
cd "$(dirname "$0")/../../.."
RUN=${RUN:-docs/results/omniglot-20w1s-wide}
export OMP_NUM_THREADS=${THREADS:-1} MKL_NUM_THREADS=${THREADS:-1}
ev() { nice -n 5 .venv/bin/python -m trainer.evaluate $RUN/model.pt --device cpu --steps 5 --support-views cross2 \
           --query-views cross2 "$@" | tail -n 8; }
if [ "${PARALLEL:-0}" = 1 ]; then
    ev --out $RUN/served/random & ev --out $RUN/served/within --within-alphabet & wait
else
    ev --out $RUN/served/random; ev --out $RUN/served/within --within-alphabet
fi
