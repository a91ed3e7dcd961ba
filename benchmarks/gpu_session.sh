#!/usr/bin/env bash
# One prepared GPU check for issues 5/17 (kernels): compile check, CUDA kernel tests, then the
# kernel benchmark,
# every result written under $OUT as it is produced (a timeout keeps what finished).
#
# Prepare here first (a machine with the package registry; the device machine has no network):
#     bash benchmarks/gpu_session.sh --prepare
# builds the gemlite wheel (pure Python; the registry has only its sdist) into .whl/ (ignored
# by git), which the device run carries and installs below. Without it gemlite is skipped with a
# note in the benchmark JSON; everything else runs the same.
# Then on the lent device machine (hydra/omegaconf/wandb are not needed here):
#     bash benchmarks/gpu_session.sh   # run(command="bash benchmarks/gpu_session.sh", carry=[".whl"], timeout_s=600)
# Budget: compile check <= 90 s, tests <= 100 s, the goal methods at 8192^2 <= 190 s, the
# other two shapes <= 75 s each, the other formats <= 55 s (about 590 s at most). gemlite adds
# ~1-2 s of its own autotuning per bit width and M (the anchors' tune_s), timed in the warm-up.
# The repo is made importable without installing it: qtrain from the checkout root and
# qtrain_kernels (both top-level folders of the checkout).
set -uo pipefail
GEMLITE_SPEC=${GEMLITE_SPEC:-gemlite==0.6.0.post2}
if [ "${1:-}" = "--prepare" ]; then
    python3 -m pip wheel --no-deps -q -w .whl "$GEMLITE_SPEC" || exit
    ls -l .whl
    exit 0
fi
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then  # optional carried wheels (see the device README)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
# $OUT holds 8 files at most (the device tool brings back no more): session.log (machine,
# GPU tests), compile_check.log, bench_kernels.log, 4 benchmark JSONs and bench_kernels.md
(nvidia-smi; python3 -c "import torch, triton; print(torch.__version__, triton.__version__)"
 python3 -c "import gemlite; print('gemlite', gemlite.__version__)") > "$OUT/session.log" 2>&1
# ahead-of-time compile check for this GPU's architecture (the same check the CPU suite runs
# for sm_80 and sm_90; issue 17): every entry point's default config, no spills
CAP=$(python3 -c "import torch; m, n = torch.cuda.get_device_capability(); print(f'sm_{m}{n}')")
timeout 90 python3 -m qtrain_kernels.compile_check --target "$CAP" --jobs 16 \
    > "$OUT/compile_check.log" 2>&1; tail -1 "$OUT/compile_check.log"
timeout 100 python3 -m pytest -q -m gpu tests/kernels -p no:cacheprovider 2>&1 \
    | tee -a "$OUT/session.log" | tail -5
# the goals first (int4 / int2 / int8 weight-only, W8A8 vs fp16, tinygemm and gemlite
# in the same process), then the other shapes, then the other formats; each stage's JSON is
# written as it goes
GOALS=fp16_cublas,torch_int4_tinygemm,qtrain_int4_g128,qtrain_int2_g128,qtrain_int8_channel,qtrain_w8a8
GOALS=$GOALS,gemlite_a16w4,gemlite_a16w2,gemlite_a16w8
bench() {  # $1 timeout, $2 shape, $3 methods, $4 tag
    timeout "$1" python3 benchmarks/bench_kernels.py --shapes "$2" --methods "$3" \
        --out "$OUT/bench_kernels_$2_$4.json" 2>&1 | tee -a "$OUT/bench_kernels.log" | tail -3
}
bench 190 8192x8192 "$GOALS" goals
bench 75 4096x14336 "$GOALS" goals
bench 75 4096x4096 "$GOALS" goals
bench 55 8192x8192 fp16_cublas,qtrain_ternary,qtrain_binary,qtrain_pq_bs8_k256 formats
ls "$OUT"/bench_kernels_*.json >/dev/null 2>&1 && python3 benchmarks/bench_kernels.py --table "$OUT"/bench_kernels_*.json > "$OUT/bench_kernels.md"
