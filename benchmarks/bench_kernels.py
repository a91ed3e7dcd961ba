"""Time qtrain's low-bit kernels against fp16 cuBLAS and torch's int4 tinygemm, on one GPU.

Same protocol as ``shared/bench/kernel_anchors.py``: every method runs inside a CUDA graph
cycling over COPIES >= 8 distinct weight copies (so weights stream from HBM, not the
50-60 MB L2), REPLAYS graph replays, microseconds per call. For each K x N in SHAPES and M in
MS it prints one JSON line with us, speedup over fp16 (same run) and percent of the
memory-bandwidth floor (bytes of weights + scales + activations / peak HBM bandwidth), and
writes all rows to ``$OUT/bench_kernels.json`` (or ``--out``).

    python benchmarks/bench_kernels.py [--out results.json] [--shapes 4096x4096] [--ms 1,16]

Autotuning happens in the warm-up before capture and is cached per GPU (qtrain_kernels.runtime).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

SHAPES = [(4096, 4096), (8192, 8192), (4096, 14336)]  # (K, N)
MS = [1, 2, 4, 8, 16, 64, 1024]  # 2-16: LLM decoding batches (one weight pass, issue 17)
COPIES = 8
REPLAYS = 20
GROUP = 128
PEAK_GBS = {"H200": 4800.0, "H100 NVL": 3900.0, "H100 PCIe": 2000.0, "H100": 3350.0,
            "A100": 2039.0}

# bits per weight element of each method's weight stream (codes), and scale bytes per group
METHODS = {
    "fp16_cublas": 16, "torch_int4_tinygemm": 4, "qtrain_int8_channel": 8,
    "qtrain_int4_g128": 4, "qtrain_int2_g128": 2, "qtrain_ternary": 2, "qtrain_binary": 1,
    "qtrain_pq_bs8_k256": 1, "qtrain_w8a8": 8,
}


def peak_bandwidth_gbs(gpu_name: str) -> float | None:
    for key, bw in PEAK_GBS.items():  # most specific names first
        if key in gpu_name:
            return bw
    return None


def bytes_moved(method: str, k: int, n: int, m: int) -> int:
    """Minimum bytes a kernel must read/write: codes + per-group fp16 scales (+ zeros) +
    fp16 activations in and out."""
    wbits = METHODS[method]
    w = k * n * wbits // 8
    if method in ("qtrain_int4_g128", "qtrain_int2_g128", "torch_int4_tinygemm"):
        w += (k // GROUP) * n * (2 + (1 if method.startswith("qtrain") else 2))
    elif method == "qtrain_pq_bs8_k256":
        w += 256 * 8 * 2
    elif method != "fp16_cublas":
        w += n * 4
    return w + m * k * 2 + m * n * 2


def floor_us(method: str, k: int, n: int, m: int, peak_gbs: float) -> float:
    return bytes_moved(method, k, n, m) / (peak_gbs * 1e3)


def make_row(method, k, n, m, us, base_us, peak_gbs) -> dict:
    row = {"kind": method, "K": k, "N": n, "M": m, "us": round(us, 3),
           "speedup_vs_fp16": round(base_us / us, 3)}
    if peak_gbs:
        row["floor_us"] = round(floor_us(method, k, n, m, peak_gbs), 3)
        row["pct_of_floor"] = round(100 * row["floor_us"] / us, 1)
    return row


def write_json(rows: list[dict], path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(rows, f, indent=1)


def graph_us(fns, x) -> float:
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for f in fns:  # warm-up: compiles and autotunes (cached) before capture
            f(x)
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for f in fns:
            f(x)
    g.replay()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(REPLAYS):
        g.replay()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) * 1e3 / (REPLAYS * len(fns))


def rel_error(f, x) -> float | None:
    """max |y - y_ref| / max |y_ref| of a packed layer against its own dequantized weight
    (float32 product), so a fast but wrong tuned configuration shows; None for baselines."""
    if not hasattr(f, "dequantize"):
        return None
    y = f(x).float()
    ref = x.float() @ f.dequantize().float().t()
    return float((y - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def build_methods(k: int, n: int, dev: str) -> dict:
    """COPIES callables per method, each with its own weights."""
    from torch import nn
    from torch.nn import functional as F

    from qtrain.nn.packed import PackedLinear

    out: dict[str, list] = {name: [] for name in METHODS}
    for _ in range(COPIES):
        lin = nn.Linear(k, n, bias=False, device=dev, dtype=torch.float32)
        w16 = lin.weight.detach().half()
        out["fp16_cublas"].append(lambda x, w=w16: F.linear(x, w))
        wq = torch.randint(0, 16, (n, k), device=dev, dtype=torch.int32)
        w4 = torch.ops.aten._convert_weight_to_int4pack((wq[:, ::2] << 4 | wq[:, 1::2]).to(torch.uint8), 8)
        sz = torch.randn(k // GROUP, n, 2, device=dev, dtype=torch.bfloat16)
        out["torch_int4_tinygemm"].append(
            lambda x, w4=w4, sz=sz: torch.ops.aten._weight_int4pack_mm(x.bfloat16(), w4, GROUP, sz))
        kw = {"backend": "triton"}
        out["qtrain_int8_channel"].append(PackedLinear.from_linear(lin, 8, None, True, **kw))
        out["qtrain_int4_g128"].append(PackedLinear.from_linear(lin, 4, GROUP, False, **kw))
        out["qtrain_int2_g128"].append(PackedLinear.from_linear(lin, 2, GROUP, False, **kw))
        out["qtrain_ternary"].append(PackedLinear.from_linear_ternary(lin, **kw))
        out["qtrain_binary"].append(PackedLinear.from_linear_binary(lin, **kw))
        codes = torch.randint(0, 256, (n, k // 8), device=dev, dtype=torch.uint8)
        cents = torch.randn(256, 8, device=dev, dtype=torch.float16) * 0.02
        out["qtrain_pq_bs8_k256"].append(PackedLinear.from_codebook(codes, cents, **kw))
        out["qtrain_w8a8"].append(PackedLinear.from_linear_w8a8(lin, **kw))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "bench_kernels.json"))
    ap.add_argument("--shapes", default=",".join(f"{k}x{n}" for k, n in SHAPES))
    ap.add_argument("--ms", default=",".join(map(str, MS)))
    ap.add_argument("--methods", default=",".join(METHODS))
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_kernels: needs a CUDA GPU (no numbers on CPU)", file=sys.stderr)
        return 2
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    ms = [int(v) for v in args.ms.split(",")]
    wanted = args.methods.split(",")
    gpu = torch.cuda.get_device_name()
    peak = peak_bandwidth_gbs(gpu)
    rows = [{"kind": "env", "gpu": gpu, "torch": torch.__version__, "peak_gbs": peak,
             "copies": COPIES, "replays": REPLAYS}]
    print(json.dumps(rows[0]), flush=True)
    for k, n in shapes:
        meths = {name: fns for name, fns in build_methods(k, n, "cuda").items() if name in wanted}
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            base = graph_us(meths["fp16_cublas"], x)
            for name, fns in meths.items():
                try:
                    us = base if name == "fp16_cublas" else graph_us(fns, x)
                    row = make_row(name, k, n, m, us, base, peak)
                    row["rel_err"] = rel_error(fns[0], x)
                except Exception as e:  # noqa: BLE001 - record and go on with the others
                    row = {"kind": name, "K": k, "N": n, "M": m, "error": repr(e)[:300]}
                rows.append(row)
                print(json.dumps(row), flush=True)
            write_json(rows, args.out)  # partial results survive a timeout
        del meths
        torch.cuda.empty_cache()
    write_json(rows, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
