"""QAT step time: int4 per-channel fake-quant resnet20 vs the FP32 step, side by side.

Builds two copies of the CIFAR resnet20 (same init), one converted to fake-quant layers
(weights: 4-bit symmetric per-output-channel min-max, :class:`UniformQuantizer`; optional
4-bit activations with EMA ranges), and times a full training step (forward, cross-entropy,
backward, SGD) on the same random batch, alternating the models every iteration so both
see the same machine state. Reports medians and the ratio; goal <= 1.3x on CPU.

    python benchmarks/bench_qat_step.py [--batch 128] [--iters 15] [--acts] [--out f.json]
"""

from __future__ import annotations

import argparse
import copy
import os

import torch
import torch.nn.functional as F
from timing import interleaved_times, medians, write_json
from torch import nn

from qtrain.models.resnet_cifar import resnet20
from qtrain.nn.convert import convert
from qtrain.nn.fake_quant import FAKE_QUANT_TYPES
from qtrain.nn.uniform_quantizer import UniformQuantizer


def quantize_model(model: nn.Module, bits: int, acts: bool) -> nn.Module:
    def build(name, m):
        wq = UniformQuantizer(bits, symmetric=True, granularity="channel")
        aq = UniformQuantizer(bits, symmetric=False, observer="ema") if acts else None
        return FAKE_QUANT_TYPES[type(m)].from_float(m, wq, aq)

    convert(model, build)
    return model


def step_fn(model, opt, x, y):
    def step():
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()

    return step


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--iters", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--acts", action="store_true", help="also fake-quantize activations")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."),
                                                  "bench_qat_step.json"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    fp32 = resnet20()
    qat = quantize_model(copy.deepcopy(fp32), args.bits, args.acts)
    x = torch.randn(args.batch, 3, 32, 32)
    y = torch.randint(0, 10, (args.batch,))
    steps = {}
    for name, m in (("fp32", fp32), ("qat", qat)):
        m.train()
        steps[name] = step_fn(m, torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9), x, y)
    times = interleaved_times(steps, args.warmup, args.iters, alternate=True)
    med = medians(times)
    row = {
        "bench": "qat_step_resnet20", "batch": args.batch, "bits": args.bits,
        "acts_quantized": args.acts, "threads": torch.get_num_threads(),
        "fp32_step_s": med["fp32"], "qat_step_s": med["qat"],
        "ratio": med["qat"] / med["fp32"], "goal_ratio": 1.3,
        "fp32_all_s": times["fp32"], "qat_all_s": times["qat"],
    }
    print(f"resnet20 batch {args.batch}, {torch.get_num_threads()} threads: "
          f"fp32 {med['fp32'] * 1e3:.1f} ms/step, W{args.bits}"
          f"{'A' + str(args.bits) if args.acts else ''} per-channel QAT "
          f"{med['qat'] * 1e3:.1f} ms/step, ratio {row['ratio']:.3f} (goal <= 1.3)")
    write_json(args.out, row, indent=1)


if __name__ == "__main__":
    main()
