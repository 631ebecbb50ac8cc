#!/usr/bin/env bash
# Builds the two 20-way zoo models from this run's 128-filter model.pt (the last checkpoint; no validation) with the
# serving settings of the models they replace (support and query views cross2 at 1 shot; query views only at 5 shots,
# 10 steps), then meta-tests each on the tasks of every other row (600, seed 1000003) into served/, two queues, one
# thread each, niced. The 5-way models stay on the 64-filter body: 128 filters changed nothing at 5 ways
# (../omniglot-20w1s-wide/served/omniglot-5w{1,5}s/). served/random{,-within} were first measured on model.pt
# itself (evaluate.sh); the zoo file's run of the random row must reproduce them.
set -euo pipefail
cd "$(dirname "$0")/../../.."
RUN=docs/results/omniglot-20w1s-wide-allclasses
PY=".venv/bin/python"
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
Z=models/zoo
$PY -m models.variant $RUN/model.pt --name omniglot-20w1s --support-views cross2 --query-views cross2 \
    --out $Z/omniglot-20w1s.pt --note "the 128-filter shift-augmented Proto-ANIL model trained on all 964 background \
characters ($RUN/) adapting on support views cross2 and predicting on query views cross2 \
(docs/results/support-views/, docs/results/query-views/)"
$PY -m models.variant $Z/omniglot-20w1s.pt --name omniglot-20w5s --steps 10 --support-views none \
    --out $Z/omniglot-20w5s.pt --note "the 128-filter 20-way Proto-ANIL model ($RUN/) served at 5 shots with 10 inner \
steps, query views cross2 (no support views at 5 shots: docs/results/support-views/)"
ev() {  # model out-dir [args]: the model's own views; ways, shots, queries and steps as the rows it replaces
    local model=$1 dir=$RUN/served/$2; shift 2
    nice -n 5 $PY -m trainer.evaluate "$Z/$model.pt" --device cpu --out "$dir" "$@" | tail -n 8
}
mkdir -p $RUN/served
ev omniglot-20w1s omniglot-20w1s-zoo --steps 5 > $RUN/served/queue-a.log 2>&1 &
ev omniglot-20w5s omniglot-20w5s --shots 5 --steps 10 > $RUN/served/queue-b.log 2>&1 &
wait
echo BUNDLE-DONE
