#!/usr/bin/env bash
# One device-tool call on a bare GPU box: wheels, GPU check (training, self-test, benchmark, GPU tests, load test),
# then everything packed into a few files under OUT (the device tool returns at most 8 files).
#
#   bash scripts/gpu_session.sh "$OUT"     (carry: .gpu with the Omniglot zips, .whl with grpcio 1.85.1,
#                                           grpcio-health-checking, grpcio-reflection and protobuf 7 wheels)
# Knobs (seconds): GPU_CHECK_TOTAL_S (385) GPU_CHECK_TRAIN_S (0: no training; T5 / T20 / TP per run, see
# gpu_train.sh) GPU_CHECK_SELFTEST_S GPU_CHECK_BENCH_BUDGET_S GPU_CHECK_PYTEST_S GPU_CHECK_LOADTEST_S.
# Long training continues across sessions: carry a run folder back and pass `--resume` (scripts/gpu_train.sh).
set -u
OUT=${1:?usage: scripts/gpu_session.sh OUT}
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export FASTADAPT_OMNIGLOT=${FASTADAPT_OMNIGLOT:-.gpu/omniglot}
export GPU_CHECK_TOTAL_S=${GPU_CHECK_TOTAL_S:-385} GPU_CHECK_SELFTEST_S=${GPU_CHECK_SELFTEST_S:-60}
export GPU_CHECK_BENCH_BUDGET_S=${GPU_CHECK_BENCH_BUDGET_S:-120} GPU_CHECK_PYTEST_S=${GPU_CHECK_PYTEST_S:-90}
export GPU_CHECK_LOADTEST_S=${GPU_CHECK_LOADTEST_S:-45}
export GPU_CHECK_BENCH_EXTRA=${GPU_CHECK_BENCH_EXTRA:---case-time-s 1 --max-call-s 3}
R=/tmp/fastadapt-gpu
rm -rf "$R"
bash scripts/gpu_check.sh "$R" > "$R.log" 2>&1
rc=$?
cp "$R.log" "$OUT/gpu_check.log"
cp "$R"/zoo/*.pt "$OUT/" 2>/dev/null
tar czf "$OUT/results.tgz" -C "$(dirname "$R")" "$(basename "$R")"
cat "$R/summary.txt"
exit $rc
