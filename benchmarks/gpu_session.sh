#!/usr/bin/env bash
# One prepared GPU check for issue 5 (kernels): CUDA kernel tests, then the kernel benchmark,
# every result written under $OUT as it is produced (a timeout keeps what finished).
#
# On the lent device machine (no network; hydra/omegaconf/wandb are not needed here):
#     bash benchmarks/gpu_session.sh           # run(command="bash benchmarks/gpu_session.sh", timeout_s=540)
# Budget: tests <= 150 s, then one benchmark per K x N (largest first), each <= 110 s.
# The repo is made importable without installing it: qtrain from the checkout root and
# qtrain_kernels as a link to kernels/ (what pyproject's package mapping does).
set -uo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then  # optional carried wheels (see the device README)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
mkdir -p /tmp/qtrain_path && ln -sfn "$PWD/kernels" /tmp/qtrain_path/qtrain_kernels
export PYTHONPATH="$PWD:/tmp/qtrain_path:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
(nvidia-smi; python3 -c "import torch, triton; print(torch.__version__, triton.__version__)") \
    > "$OUT/machine.txt" 2>&1
timeout 150 python3 -m pytest -q -m gpu tests/kernels -p no:cacheprovider 2>&1 \
    | tee "$OUT/gpu_tests.log" | tail -5
for shape in 8192x8192 4096x14336 4096x4096; do
    timeout 110 python3 benchmarks/bench_kernels.py --shapes "$shape" \
        --out "$OUT/bench_kernels_$shape.json" 2>&1 | tee "$OUT/bench_kernels_$shape.log" | tail -3
done
