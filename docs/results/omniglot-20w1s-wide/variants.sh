#!/usr/bin/env bash
# The 5-way variants of the 128-filter body (README.md here) built as ../omniglot-20w1s-proto-anil-shift/bundle.sh
# builds the bundled ones (models.variant: the same tensors, the serving settings of the bundled models), into
# VARIANTS (default /tmp/wide-variants; regenerated, not committed), then meta-tested on the tasks of the bundled
# models' rows (served/omniglot-5w1s/, served/omniglot-5w5s/), one niced thread.
#   docs/results/omniglot-20w1s-wide/variants.sh
set -euo pipefail
cd "$(dirname "$0")/../../.."
RUN=docs/results/omniglot-20w1s-wide
V=${VARIANTS:-/tmp/wide-variants}
PY=".venv/bin/python"
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
mkdir -p "$V"
$PY -m models.variant $RUN/model.pt --name omniglot-20w1s --support-views cross2 --query-views cross2 \
    --out "$V/omniglot-20w1s.pt" --note "the 128-filter body ($RUN/) with the bundled model's views"
$PY -m models.variant "$V/omniglot-20w1s.pt" --name omniglot-5w1s --ways 5 --steps 3 --out "$V/omniglot-5w1s.pt" \
    --note "the 5-way variant of the 128-filter body ($RUN/), support and query views cross2"
$PY -m models.variant "$V/omniglot-5w1s.pt" --name omniglot-5w5s --steps 10 --support-views none \
    --out "$V/omniglot-5w5s.pt" --note "the 5-way variant of the 128-filter body ($RUN/) at 5 shots, query views cross2"
ev() {  # model out-dir [args]
    local model=$1 dir=$RUN/served/$2; shift 2
    nice -n 5 $PY -m trainer.evaluate "$V/$model.pt" --device cpu --out "$dir" "$@" | tail -n 8
}
ev omniglot-5w5s omniglot-5w5s --ways 5 --shots 5 --queries 5 --steps 10
ev omniglot-5w1s omniglot-5w1s --ways 5 --steps 3
