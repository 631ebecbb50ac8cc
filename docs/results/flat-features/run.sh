#!/usr/bin/env bash
# The A/B of README.md here: 2,000 Proto-ANIL iterations from the bundled 64-filter all-characters body with the
# last feature map averaged (mean, the shipped body) and flattened (flat), then the meta-test of both and of the
# starting model, 600 tasks at 0 steps without views, within one alphabet and random. One thread each, niced;
# about 9 min per training run and 15-60 s per evaluation on the 2-core EPYC. OUT (default /tmp/flat-features) holds
# the checkpoints; the result files are copied here.
set -euo pipefail
cd "$(dirname "$0")/../../.."
HERE=docs/results/flat-features OUT=${OUT:-/tmp/flat-features}
START=docs/results/omniglot-20w1s-proto-anil-allclasses/model.pt
py() { PYTHONPATH=. OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 nice -n 5 .venv/bin/python "$HERE/features.py" "$@"; }
for m in flat mean; do
  py "$m" trainer omniglot-20w1s --recipe proto-anil --init_from "$START" --device cpu --out_dir "$OUT/$m" \
     --log_every 100 --val_every 100000 --checkpoint_every 1000 --progress false --train_within_alphabet 0.5 \
     --train_shift 2 --val_classes 0 --cosine_lr true --cosine_start 0 --iterations 2000 --meta_lr 2e-4 \
     --min_meta_lr 1e-5 --final_eval false
  cp "$OUT/$m/log.jsonl" "$HERE/$m-log.jsonl"
done
ev() {  # MODE CHECKPOINT NAME [--within-alphabet]
  py "$1" trainer.evaluate "$2" --tasks 600 --steps 0 --support-views none --query-views none --out "$OUT/eval-$3" "${@:4}"
  cp "$OUT/eval-$3/results.json" "$HERE/$3.json"; cp "$OUT/eval-$3/results.md" "$HERE/$3.md"
}
ev mean "$START" start-within --within-alphabet
ev mean "$OUT/mean/last.pt" mean-within --within-alphabet
ev flat "$OUT/flat/last.pt" flat-within --within-alphabet
ev mean "$OUT/mean/last.pt" mean-random
ev flat "$OUT/flat/last.pt" flat-random
