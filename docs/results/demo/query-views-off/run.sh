#!/usr/bin/env bash
# The demo's bracketed latencies (README "make demo"): the bundled zoo with query views off on the two 1-shot models
# (support views kept), served by `python -m server.demo --model-dir`, beside `make demo` on the zoo itself, back to
# back so both are of one quarter hour. Nothing else should run. Writes ../demo.{json,md} and demo.{json,md} here.
set -euo pipefail
cd "$(dirname "$0")/../../../.."
DIR=${DIR:-/tmp/noqv} HERE=docs/results/demo/query-views-off
rm -rf "$DIR" && mkdir -p "$DIR" && cp models/zoo/*.pt "$DIR/"
for m in omniglot-5w1s omniglot-20w1s; do
  .venv/bin/python -m models.variant "models/zoo/$m.pt" --name "$m" --query-views none --out "$DIR/$m.pt" \
      --note "the bundled $m with its query views off, for the demo's latency without them"
done
.venv/bin/python -m server.demo --out docs/results/demo --no-progress
.venv/bin/python -m server.demo --model-dir "$DIR" --out "$HERE" --no-progress
