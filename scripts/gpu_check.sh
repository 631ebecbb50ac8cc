#!/usr/bin/env bash
# The one prepared GPU check: environment, GPU tests, Triton self-test, benchmark, then training (hook below).
#
#   bash scripts/gpu_check.sh RESULTS_DIR            # on a bare CUDA box, from the repository root
#   GPU_CHECK_DRY=1 bash scripts/gpu_check.sh DIR    # CPU rehearsal: same stages, everything shrunk
#
# Every stage runs even when an earlier one failed; each logs to RESULTS_DIR/<stage>.log (also on stdout) and adds
# a line "stage rc seconds" to RESULTS_DIR/summary.txt. A global deadline keeps the whole script inside one device
# call (the device tool stops a command at 600 s). Knobs (seconds, environment):
#   GPU_CHECK_STAGES: comma-separated stages to run (train,gpu-selftest,bench,profile,pytest-gpu,loadtest; default:
#   all that are enabled), so a lease can be split into calls.
#   PY (python3)  GPU_CHECK_TOTAL_S (570)  GPU_CHECK_PYTEST_S (150)  GPU_CHECK_SELFTEST_S (90)
#   GPU_CHECK_BENCH_BUDGET_S (240: the benchmark's own budget, it records the points it had no time for as skipped)
#   GPU_CHECK_PROFILE_S (60: kernels.bench.profile, per-kernel times at T=1 and 128)
#   GPU_CHECK_HIGHER_DIR: a folder holding the pure-Python `higher` package, for a box without it (default: looks in
#   .venv/lib/python*/site-packages/higher, so carrying that one folder is enough).
set -u
RESULTS_DIR=${1:?usage: scripts/gpu_check.sh RESULTS_DIR}
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO" || exit 2
mkdir -p "$RESULTS_DIR" || exit 2
RESULTS_DIR=$(cd "$RESULTS_DIR" && pwd)
DRY=${GPU_CHECK_DRY:-0}

if [ "$DRY" = 1 ]; then
    [ -z "${PY:-}" ] && [ -x .venv/bin/python ] && PY=.venv/bin/python
    TOTAL_S=${GPU_CHECK_TOTAL_S:-420}; PYTEST_S=${GPU_CHECK_PYTEST_S:-120}; SELFTEST_S=${GPU_CHECK_SELFTEST_S:-200}
    BENCH_BUDGET_S=${GPU_CHECK_BENCH_BUDGET_S:-60}; BENCH_ARGS=(--matrix tiny --repeats 2 --threads 1)
    PROFILE_ARGS=(--config tiny --tasks 1,2 --threads 1)
else
    TOTAL_S=${GPU_CHECK_TOTAL_S:-570}; PYTEST_S=${GPU_CHECK_PYTEST_S:-150}; SELFTEST_S=${GPU_CHECK_SELFTEST_S:-90}
    BENCH_BUDGET_S=${GPU_CHECK_BENCH_BUDGET_S:-240}; BENCH_ARGS=(--matrix gpu)
    PROFILE_ARGS=(--config omniglot-5w1s --tasks 1,128)
fi
PY=${PY:-python3}
export PY REPO DRY
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
START=$(date +%s)
SUMMARY="$RESULTS_DIR/summary.txt"
: > "$SUMMARY"
FAILED=0

remaining() { echo $(( TOTAL_S - ($(date +%s) - START) )); }

# stage NAME TIMEOUT_S COMMAND...: run with a timeout capped by the global deadline, tee the log, record rc.
stage() {
    local name=$1 limit=$2 left rc t0
    shift 2
    if [ -n "${GPU_CHECK_STAGES:-}" ] && [ "$name" != environment ] && [[ ",$GPU_CHECK_STAGES," != *",$name,"* ]]; then
        echo "== $name: not selected (GPU_CHECK_STAGES=$GPU_CHECK_STAGES)"
        echo "$name unselected 0" >> "$SUMMARY"
        return 0
    fi
    left=$(( $(remaining) - 5 ))
    [ "$limit" -gt "$left" ] && limit=$left
    if [ "$limit" -lt 10 ]; then
        echo "== $name: SKIPPED (global deadline of ${TOTAL_S}s reached)" | tee "$RESULTS_DIR/$name.log"
        echo "$name skipped 0" >> "$SUMMARY"
        return 0
    fi
    echo "== $name (timeout ${limit}s): $*" | tee "$RESULTS_DIR/$name.log"
    t0=$(date +%s)
    if declare -F "$1" >/dev/null; then  # a shell function: `timeout` needs a process, so hand it to a child bash
        set -- bash -c "$(declare -f "$1"); $*"
    fi
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$RESULTS_DIR/$name.log"
    rc=${PIPESTATUS[0]}
    [ "$rc" = 124 ] && echo "== $name: TIMED OUT after ${limit}s" | tee -a "$RESULTS_DIR/$name.log"
    echo "== $name: rc=$rc in $(( $(date +%s) - t0 ))s" | tee -a "$RESULTS_DIR/$name.log"
    echo "$name $rc $(( $(date +%s) - t0 ))" >> "$SUMMARY"
    [ "$rc" = 0 ] || FAILED=1
    return 0
}

# `higher` is a peer in the benchmark; it is pure Python, so a carried copy of the package folder is enough.
if ! "$PY" -c "import higher" >/dev/null 2>&1; then
    HIGHER_DIR=${GPU_CHECK_HIGHER_DIR:-$(ls -d .venv/lib/python*/site-packages/higher 2>/dev/null | head -n 1)}
    if [ -n "$HIGHER_DIR" ] && [ -f "$HIGHER_DIR/__init__.py" ]; then
        PYDEPS=$(mktemp -d)
        ln -s "$(cd "$HIGHER_DIR" && pwd)" "$PYDEPS/higher"
        export PYTHONPATH="$PYTHONPATH:$PYDEPS"
    fi
fi

environment() {
    echo "date: $(date -u +%FT%TZ)  host: $(hostname)  dry: $DRY  repo: $REPO"
    echo "commit: $(git -C "$REPO" rev-parse HEAD 2>/dev/null || echo 'n/a (no .git)')"
    nvidia-smi || echo "nvidia-smi: not available"
    "$PY" - <<'PYEOF'
import importlib, platform, sys
print("python", sys.version.split()[0], platform.platform())
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available(),
      "cudnn", torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", torch.cuda.get_device_name(0), f"sm_{p.major}{p.minor}", f"{p.total_memory / 2**30:.1f} GiB")
for name in ("triton", "numpy", "grpc", "google.protobuf", "onnx", "onnxruntime", "pytest", "tqdm", "matplotlib",
             "higher", "PIL", "prometheus_client", "grpc_tools"):
    try:
        print(f"{name:18s}", getattr(importlib.import_module(name), "__version__", "present"))
    except Exception as exc:
        print(f"{name:18s} MISSING ({type(exc).__name__}: {exc})")
PYEOF
}

stage environment 60 environment
# TRAINING first: the bundled models are what a later session cannot recompute without a GPU.
# GPU_CHECK_TRAIN_S > 0 runs scripts/gpu_train.sh with T5/T20/TP (seconds per run) from the environment.
if [ "${GPU_CHECK_TRAIN_S:-0}" -gt 0 ]; then
    stage train "$GPU_CHECK_TRAIN_S" bash scripts/gpu_train.sh "$RESULTS_DIR"
fi
if [ -f kernels/checks/gpu_selftest.py ]; then
    SELFTEST_ENV=()  # the CPU rehearsal runs the self-test's tiny shapes under the Triton interpreter
    [ "$DRY" = 1 ] && SELFTEST_ENV=(env FASTADAPT_SELFTEST_DEVICE=cpu TRITON_INTERPRET=1)
    stage gpu-selftest "$SELFTEST_S" "${SELFTEST_ENV[@]}" "$PY" -m kernels.checks.gpu_selftest --out "$RESULTS_DIR/selftest.json" \
        --precisions "${GPU_CHECK_PRECISIONS:-ieee,tf32x3}" $([ "$DRY" = 1 ] && echo --tiny)
else
    echo "gpu-selftest absent 0" >> "$SUMMARY"
fi
BENCH_LEFT=$(( $(remaining) - 60 ))
[ "$BENCH_BUDGET_S" -gt "$BENCH_LEFT" ] && BENCH_BUDGET_S=$BENCH_LEFT
[ "$BENCH_BUDGET_S" -lt 1 ] && BENCH_BUDGET_S=1
stage bench $(( BENCH_BUDGET_S + 60 )) "$PY" -m kernels.bench --out "$RESULTS_DIR/bench" "${BENCH_ARGS[@]}" \
    --budget-s "$BENCH_BUDGET_S" ${GPU_CHECK_BENCH_EXTRA:-}

# PROFILE: per-kernel time of one adapt + predict at T=1 and T=128, and the launch gaps (what to optimize next).
stage profile "${GPU_CHECK_PROFILE_S:-60}" "$PY" -m kernels.bench.profile --out "$RESULTS_DIR/profile" \
    "${PROFILE_ARGS[@]}"

# GPU tests after the benchmark: the self-test and the benchmark have compiled the common kernels by then.
# Collection errors (e.g. a test module that needs grpc_tools, absent on the box) must not stop the GPU tests.
# Most telling first (a timeout then cuts the least): whole adaptations and 1024-task batches, the graph backend and
# trainer capture, the bench cross-check, then the per-kernel cases the self-test already covered at full size.
GPU_TEST_ORDER=(tests/kernels/test_triton_backend.py tests/kernels/test_graph_backend.py tests/trainer
    tests/kernels/test_bench.py tests/kernels/test_profile.py tests/kernels/test_head_kernels.py
    tests/kernels/test_conv_kernels.py tests)
stage pytest-gpu "$PYTEST_S" "$PY" -m pytest -q -m gpu -rfEs --durations 15 --continue-on-collection-errors \
    "${GPU_TEST_ORDER[@]}"
# LOAD TEST: AdaptAndPredict through gRPC on loopback with the GPU engine (needs grpcio >= 1.85.1, protobuf 7).
if [ "${GPU_CHECK_LOADTEST_S:-0}" -gt 0 ]; then
    ZOO=models/zoo; [ -f "$RESULTS_DIR/zoo/omniglot-5w1s.pt" ] && ZOO="$RESULTS_DIR/zoo"
    stage loadtest "$GPU_CHECK_LOADTEST_S" "$PY" -m server.loadtest --out "$RESULTS_DIR/loadtest" --duration 5 \
        --model-dir "$ZOO" --backend "${GPU_CHECK_LOADTEST_BACKEND:-auto}"
fi

echo "== total $(( $(date +%s) - START ))s; stages (name rc seconds):"
cat "$SUMMARY"
exit $FAILED
