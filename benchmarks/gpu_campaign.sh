#!/usr/bin/env bash
# One prepared GPU campaign (issue 16 item 4): on one H100/H200, the FP32 CIFAR-10 ResNet-20 at
# He et al. 2016's schedule (164 epochs, batch 128, /10 at epochs 82 and 123, wd 1e-4; paper
# 91.25%), then TTQ, PACT W4A4 and LSQ W2A2 fine-tuned from it at once on the same GPU, inside
# ~9 minutes of wall time including setup. Every run's summary and logs, the FP32 weights and a
# paper-vs-ours table go to $OUT, refreshed every 20 s (a kill keeps the last refresh).
# Driver and plan: benchmarks/campaign_run.py (its docstring); data: benchmarks/campaign_data.py.
#
# Time plan (an estimate, not yet measured on a GPU): one ResNet-20 step at batch 128 is
# ~31 GFLOP (41 MMAC/image x 2 x 3 for forward + backward) in convs of 16-64 channels that
# reach a few % of the ~750 TFLOP/s the 4096x4096x1024 fp16 GEMM anchor shows
# (/work/shared/bench/anchors-h200-2026-11-27.json: 46 us), plus ~0.6 GB of BN/ReLU traffic:
# ~1 ms of GPU time; the ~300 eager kernel launches and Lightning's per-step hooks cost more on
# the CPU side (~3-5 ms), so a lone run is launch-bound at ~4-5 ms/step: 164 x 391 steps =
# 64k steps = 260-330 s. Budget 540 s: setup ~20 s, FP32 boxed at ~310 s of training (a slow
# run stops after epoch ~150, past both LR drops), the recipes' phase ~150 s (each run's
# start-up and tests ~50 s, ~90 s of fine-tuning: ~20 epochs each at an assumed 2x the FP32
# epoch time for three quantized runs sharing the GPU). The table records what was measured.
#
# Here, once (wheels the device lacks: hydra-core, omegaconf, antlr4; CIFAR-10 packed to 19 MB):
#     bash benchmarks/gpu_campaign.sh prepare [/work/shared/data/cifar10]
# On the device machine (after the kernels' benchmarks/gpu_session.sh):
#     run(command="bash benchmarks/gpu_campaign.sh", carry=[".whl", ".campaign_data"], timeout_s=600)
# On a CPU, the same path at tiny scale (tests/test_gpu_campaign.py):
#     CAMPAIGN_SCALE=tiny OUT=/tmp/out bash benchmarks/gpu_campaign.sh
#
# Settings (environment): CAMPAIGN_BUDGET_S (540: seconds from this script's start to the last
# refresh), CAMPAIGN_RECIPES (comma list of recipes/*.yaml names), CAMPAIGN_FT_EPOCHS (0: sized
# to the time left), CAMPAIGN_FT_LR (0.01), CAMPAIGN_PRECISION (bf16-mixed | 32-true),
# CAMPAIGN_FP32_EPOCHS (164), CAMPAIGN_MPS=1 (start NVIDIA MPS so the concurrent runs share the
# GPU without time-slicing; falls back to plain sharing if a CUDA probe fails under it),
# CAMPAIGN_DATA (a folder with cifar-10-batches-py/ to use instead of unpacking), CAMPAIGN_PACKED
# (the packed data to unpack: .campaign_data), CAMPAIGN_WORK (run dirs: /tmp/qtrain_campaign).
set -uo pipefail
T0=$(date +%s.%N)
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if [ "${1:-}" = "prepare" ]; then
    set -e
    SRC=${2:-/work/shared/data/cifar10}
    mkdir -p .whl
    "$PY" -m pip download -q --no-deps --only-binary=:all: -d .whl \
        hydra-core==1.3.8 omegaconf==2.3.1
    # antlr4 4.9.3 is an sdist on PyPI: build its (pure-Python) wheel here
    "$PY" -m pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3
    rm -f .whl/antlr4-python3-runtime-*.tar.gz
    "$PY" benchmarks/campaign_data.py pack "$SRC" .campaign_data
    du -sh .whl .campaign_data
    exit 0
fi

SCALE=${CAMPAIGN_SCALE:-full}
OUT=${OUT:-campaign_out}
WORK=${CAMPAIGN_WORK:-/tmp/qtrain_campaign}
mkdir -p "$OUT" "$WORK"
OUT=$(cd "$OUT" && pwd)
log() { echo "[setup $(date +%T)] $*" | tee -a "$OUT/campaign.log"; }

# hydra-core / omegaconf / antlr4 from the carried wheels where the machine lacks them
if ! "$PY" -c "import hydra, omegaconf" 2>/dev/null; then
    if ls .whl/*.whl >/dev/null 2>&1; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
    fi
    "$PY" -c "import hydra, omegaconf" || { log "no hydra/omegaconf: carry .whl (prepare)"; exit 2; }
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 WANDB_MODE=offline

{ date -u; uname -a; getconf _NPROCESSORS_ONLN; nvidia-smi 2>&1 | head -20; } > "$OUT/machine.txt" 2>&1
# one import of torch (seconds): versions into machine.txt, the device's name into MACHINE
MACHINE=$("$PY" -c "
import sys, torch, pytorch_lightning as pl
name = torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU'
print('python', sys.version.split()[0], 'torch', torch.__version__, 'lightning', pl.__version__,
      'device', name, file=sys.stderr)
print(name)" 2>> "$OUT/machine.txt")
log "scale $SCALE on $MACHINE, $(getconf _NPROCESSORS_ONLN) cores"

# CIFAR-10 in the pickle layout data=cifar10 reads
DATA=${CAMPAIGN_DATA:-}
PACKED=${CAMPAIGN_PACKED:-.campaign_data}
if [ -z "$DATA" ]; then
    DATA=$WORK/data
    if [ ! -f "$DATA/cifar-10-batches-py/test_batch" ]; then
        "$PY" benchmarks/campaign_data.py unpack "$PACKED" "$DATA" >> "$OUT/campaign.log" 2>&1 \
            || { log "unpacking .campaign_data failed (carry it; prepare makes it)"; exit 2; }
    fi
fi
log "data ready: $DATA"

MPS_STARTED=0
if [ "${CAMPAIGN_MPS:-0}" = "1" ] && command -v nvidia-cuda-mps-control >/dev/null; then
    export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps_pipe CUDA_MPS_LOG_DIRECTORY=/tmp/mps_log
    mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
    if nvidia-cuda-mps-control -d && timeout 60 "$PY" -c \
        "import torch; assert torch.ones(8, device='cuda').sum().item() == 8"; then
        MPS_STARTED=1; log "MPS on"
    else
        echo quit | timeout 10 nvidia-cuda-mps-control; MPS_STARTED=0
        unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY; log "MPS failed: plain sharing"
    fi
fi

DMON_PID=
if [ "$SCALE" = full ] && command -v nvidia-smi >/dev/null; then
    nvidia-smi dmon -s um -d 5 > "$OUT/gpu_util.log" 2>&1 &
    DMON_PID=$!
fi

ARGS=(--out "$OUT" --work "$WORK" --data-root "$DATA" --scale "$SCALE" --t0 "$T0"
      --machine "$MACHINE, $(getconf _NPROCESSORS_ONLN) CPU cores$([ $MPS_STARTED = 1 ] && echo ', MPS')")
[ -n "${CAMPAIGN_BUDGET_S:-}" ] && ARGS+=(--budget-s "$CAMPAIGN_BUDGET_S")
[ -n "${CAMPAIGN_RECIPES+x}" ] && ARGS+=(--recipes "$CAMPAIGN_RECIPES")
[ -n "${CAMPAIGN_FT_EPOCHS:-}" ] && ARGS+=(--ft-epochs "$CAMPAIGN_FT_EPOCHS")
[ -n "${CAMPAIGN_FT_LR:-}" ] && ARGS+=(--ft-lr "$CAMPAIGN_FT_LR")
[ -n "${CAMPAIGN_PRECISION:-}" ] && ARGS+=(--precision "$CAMPAIGN_PRECISION")
[ -n "${CAMPAIGN_FP32_EPOCHS:-}" ] && ARGS+=(--fp32-epochs "$CAMPAIGN_FP32_EPOCHS")
[ "$SCALE" = tiny ] && ARGS+=(--threads 1 --refresh-s 10)

"$PY" benchmarks/campaign_run.py "${ARGS[@]}"
RC=$?
[ -n "$DMON_PID" ] && kill "$DMON_PID" 2>/dev/null
[ "$MPS_STARTED" = 1 ] && echo quit | timeout 10 nvidia-cuda-mps-control
log "campaign exit $RC after $(( $(date +%s) - ${T0%.*} )) s"
exit $RC
