#!/usr/bin/env bash
# GPU meta-training for the bundled models and the paper reproduction, each run capped in wall time.
# Usage: scripts/gpu_train.sh RESULTS_DIR   (env: PY=python3, FASTADAPT_OMNIGLOT=<folder with the zips>,
#        T5=seconds for omniglot-5w1s, T20=seconds for omniglot-20w1s, TP=seconds for the paper-split 5w1s run,
#        TP20=seconds for the paper-split 20w1s run,
#        RESUME_FROM=<folder of earlier run folders, e.g. an unpacked runs.tgz carried in .gpu/runs>)
# Long schedules span sessions: each session's runs.tgz holds every run folder with its state.pt; unpack it into
# .gpu/runs, carry .gpu, and the same command continues each run bit-for-bit with --resume.
set -u
R=${1:?results dir}
PY=${PY:-python3}
mkdir -p "$R/train" "$R/zoo"
W=${TRAIN_WORK:-/tmp/fastadapt-train}  # run folders (checkpoints, states, plots) stay here; $R gets the essentials
export FASTADAPT_OMNIGLOT=${FASTADAPT_OMNIGLOT:-.gpu/omniglot}
export PYTHONUNBUFFERED=1
common=(--progress false --log-every "${LOG_EVERY:-500}" --val-every 2000 --checkpoint-every 5000 --iterations 60000)

if [ "${SKIP_THROUGHPUT:-0}" != 1 ]; then
echo "== training throughput (same run: per-task loop vs batched vs CUDA graph)"
timeout 120 $PY -m trainer.throughput --iters 50 --out "$R/train/throughput" 2>&1 | tee "$R/train/throughput.log"
timeout 120 $PY -m trainer.throughput --iters 50 --algorithm fomaml --out "$R/train/throughput" 2>&1 \
  | tee -a "$R/train/throughput.log"
fi

run() {  # name seconds split zoo-file [extra trainer args]
  echo "== $1 on the $3 split for ${2}s"
  local resume=()
  if [ -f "${RESUME_FROM:-/nonexistent}/$1-$3/state.pt" ]; then
    mkdir -p "$W" && cp -r "$RESUME_FROM/$1-$3" "$W/" && resume=(--resume)
    echo "   resuming from $RESUME_FROM/$1-$3"
  fi
  timeout $(( $2 + 150 )) $PY -m trainer "$1" "${common[@]}" --max-seconds "$2" --split "$3" \
    --out-dir "$W/$1-$3" ${4:+--zoo "$R/zoo/$4"} "${resume[@]}" "${@:5}" 2>&1 | grep --line-buffered -v '^{"config"' | tee "$R/train/$1-$3.log" | tail -12
}
# Bundled models meta-train with the serving BN policy ('support'), so training matches how they are served.
[ "${T5:-100}" -gt 0 ] && run omniglot-5w1s "${T5:-100}" background omniglot-5w1s.pt --bn-policy support
[ "${T20:-0}" -gt 0 ] && run omniglot-20w1s "$T20" background omniglot-20w1s.pt --bn-policy support
[ "${TP:-0}" -gt 0 ] && run omniglot-5w1s "$TP" paper ""
# The 20-way paper reproduction; a run begun on the CPU continues here too (RESUME_FROM=.gpu/runs holding
# omniglot-20w1s-paper/ with its state.pt: parameters and Adam state exactly, the task sampler re-seeded).
[ "${TP20:-0}" -gt 0 ] && run omniglot-20w1s "$TP20" paper ""
# Every run folder (with its state.pt, for the next session's --resume) as one archive: the device tool returns at
# most 8 files.
tar czf "$R/train/runs.tgz" --exclude=last.pt -C "$W" .
ls -la "$R/zoo" "$R/train"
