#!/usr/bin/env bash
# What the bundled models get wrong (README.md here): the served 5-way 5-shot row (random tasks, 10 steps) and the
# 20-way 1-shot within-alphabet row (5 steps, support and query views), each the meta-test of its README row
# recorded query by query (errors.py), then tabled (summary.py) and the most confused pairs drawn (pairs.py).
# One thread, niced: about 2 and 8 minutes on the 2-core EPYC beside one training run.
set -euo pipefail
mkdir -p "$(dirname "$0")/5w5s" "$(dirname "$0")/20w1s-within"
cd "$(dirname "$0")/../../.."
HERE=docs/results/errors
export PYTHONPATH=. OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
py() { nice -n 5 .venv/bin/python "$@"; }
py $HERE/errors.py models/zoo/omniglot-5w5s.pt --device cpu --out $HERE/5w5s --ways 5 --shots 5 --queries 5 \
   --steps 10 > $HERE/5w5s/run.log 2>&1
py $HERE/errors.py models/zoo/omniglot-20w1s.pt --device cpu --out $HERE/20w1s-within --steps 5 --within-alphabet \
   > $HERE/20w1s-within/run.log 2>&1
for d in 5w5s 20w1s-within; do
  py $HERE/summary.py $HERE/$d > /dev/null
  py $HERE/pairs.py $HERE/$d/errors.json $HERE/$d/pairs.png 8
done
