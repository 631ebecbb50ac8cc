#!/usr/bin/env bash
# One device-tool call on a bare GPU box: wheels, GPU check (training, self-test, benchmark, GPU tests, load test),
# then everything packed into a few files under OUT (the device tool returns at most 8 files).
#
#   bash scripts/gpu_session.sh "$OUT"     (carry: .gpu with the Omniglot zips, .whl with grpcio 1.85.1,
#                                           grpcio-health-checking, grpcio-reflection and protobuf 7 wheels)
# Knobs (seconds): GPU_CHECK_TOTAL_S (385) GPU_CHECK_TRAIN_S (0: no training; T5 / T20 / TP per run, see
# gpu_train.sh) GPU_CHECK_SELFTEST_S GPU_CHECK_BENCH_BUDGET_S GPU_CHECK_PYTEST_S GPU_CHECK_LOADTEST_S.
# Long training continues across sessions: carry a run folder back and pass `--resume` (scripts/gpu_train.sh).
#
# Runbook (one device call of ~9.5 min inside a 15-minute lease), from the repository root here:
#   mkdir -p .gpu/omniglot .gpu/runs && cp ../shared/data/omniglot/*.zip .gpu/omniglot/
#   cp -r runs/omniglot-20w1s-paper-cpu .gpu/runs/omniglot-20w1s-paper    # a CPU run to continue (optional)
#   (wheels: see the device README; keep .gpu/triton-cache.tgz from the last session's $OUT)
#   call 1, carry [".gpu", ".whl"], timeout_s 480 (kernels: self-test, bench, profile, GPU tests):
#     GPU_CHECK_STAGES=gpu-selftest,bench,profile,pytest-gpu GPU_CHECK_TOTAL_S=450 GPU_CHECK_PYTEST_S=150 \
#     bash scripts/gpu_session.sh "$OUT"
#   save $OUT (results.tgz, triton-cache.tgz) at once, then call 2 on the still-warm machine, timeout_s 330:
#     GPU_CHECK_STAGES=train,loadtest GPU_CHECK_TOTAL_S=310 GPU_CHECK_TRAIN_S=200 SKIP_THROUGHPUT=1 T5=0 TP20=140 \
#     RESUME_FROM=.gpu/runs bash scripts/gpu_session.sh "$OUT"
#   then copy triton-cache.tgz to .gpu/, unpack results.tgz (runs.tgz inside holds the run to resume next time),
#   and give the machine back.
set -u
OUT=${1:?usage: scripts/gpu_session.sh OUT}
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export FASTADAPT_OMNIGLOT=${FASTADAPT_OMNIGLOT:-.gpu/omniglot}
# Triton's compile cache survives sessions: compiling the kernels took most of the first session's device minutes.
# It comes back as $OUT/triton-cache.tgz; put that file in .gpu/ and carry .gpu, and the kernels load instead of
# compiling (same Triton and GPU architecture: the cache keys on both, so a stale entry is simply not used).
export TRITON_CACHE_DIR=/tmp/fastadapt-triton-cache
mkdir -p "$TRITON_CACHE_DIR"
[ -f .gpu/triton-cache.tgz ] && tar xzf .gpu/triton-cache.tgz -C "$TRITON_CACHE_DIR" \
    && echo "triton cache: $(find "$TRITON_CACHE_DIR" -type f | wc -l) files from .gpu/triton-cache.tgz"
export GPU_CHECK_TOTAL_S=${GPU_CHECK_TOTAL_S:-385} GPU_CHECK_SELFTEST_S=${GPU_CHECK_SELFTEST_S:-60}
export GPU_CHECK_BENCH_BUDGET_S=${GPU_CHECK_BENCH_BUDGET_S:-120} GPU_CHECK_PYTEST_S=${GPU_CHECK_PYTEST_S:-90}
export GPU_CHECK_LOADTEST_S=${GPU_CHECK_LOADTEST_S:-120}  # the server warms every bucket before it serves
export GPU_CHECK_BENCH_EXTRA=${GPU_CHECK_BENCH_EXTRA:---case-time-s 1 --max-call-s 3}
R=/tmp/fastadapt-gpu
rm -rf "$R"
bash scripts/gpu_check.sh "$R" > "$R.log" 2>&1
rc=$?
cp "$R.log" "$OUT/gpu_check.log"
cp "$R"/zoo/*.pt "$OUT/" 2>/dev/null
tar czf "$OUT/results.tgz" -C "$(dirname "$R")" "$(basename "$R")"
tar czf "$OUT/triton-cache.tgz" -C "$TRITON_CACHE_DIR" . && ls -la "$OUT"
cat "$R/summary.txt"
exit $rc
