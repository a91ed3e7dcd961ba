"""Time qtrain's low-bit kernels against fp16 cuBLAS and torch's int4 tinygemm, on one GPU.

Same protocol as ``shared/bench/kernel_anchors.py``: every method runs inside a CUDA graph
cycling over COPIES >= 8 distinct weight copies (so weights stream from HBM, not the
50-60 MB L2), REPLAYS graph replays, microseconds per call. For each K x N in SHAPES and M in
MS it prints one JSON line with us, speedup over fp16 (same run) and percent of the
memory-bandwidth floor (bytes of weights + scales + activations / peak HBM bandwidth), and
writes all rows to ``$OUT/bench_kernels.json`` (or ``--out``).

    python benchmarks/bench_kernels.py [--out results.json] [--shapes 4096x4096] [--ms 1,16]
    python benchmarks/bench_kernels.py --table results*.json > results.md   # no GPU needed

Autotuning happens in the warm-up before capture and is cached per GPU (qtrain_kernels.runtime).

gemlite (mobiusml's Triton low-bit GEMM library, ``pip install gemlite``) is timed beside them
in the same process when it imports: A16W8 / W4 / W2, group 128, fp16 scales and zero-points,
built as ``shared/bench/kernel_anchors.py`` builds it. It needs a GPU at import (it reads the
device's compute capability), so without one -- or without the package -- its methods are
skipped with one ``{"kind": "note", "gemlite": ...}`` row saying why.
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
    "gemlite_a16w8": 8, "gemlite_a16w4": 4, "gemlite_a16w2": 2,
}
GEMLITE = {name: bits for name, bits in METHODS.items() if name.startswith("gemlite_")}


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
    if method in ("qtrain_int4_g128", "qtrain_int2_g128", "torch_int4_tinygemm", *GEMLITE):
        # per group: fp16 scale + zero-point (uint8 for qtrain, fp16 for tinygemm / gemlite)
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


def table(rows: list[dict]) -> str:
    """Markdown table of benchmark rows (one line per measurement, errors included; notes and
    the environment above it), sorted by shape, M and ``METHODS`` order."""
    order = {name: i for i, name in enumerate(METHODS)}
    head = [f"- {r['kind']}: " + ", ".join(f"{k}={v}" for k, v in r.items() if k != "kind")
            for r in rows if r["kind"] in ("env", "note")]
    meas = sorted((r for r in rows if r["kind"] in METHODS),
                  key=lambda r: (r["K"], r["N"], r.get("M", 0), order[r["kind"]]))
    lines = ["| K x N | M | method | us | x fp16 | % of floor | rel err |",
             "|---|---|---|---|---|---|---|"]
    for r in meas:
        shape = f"{r['K']}x{r['N']}"
        if "error" in r:
            lines.append(f"| {shape} | {r.get('M', '-')} | {r['kind']} | error: "
                         f"{r['error'][:80].replace('|', '/')} | | | |")
            continue
        err = "-" if r.get("rel_err") is None else f"{r['rel_err']:.1e}"
        lines.append(f"| {shape} | {r['M']} | {r['kind']} | {r['us']:.1f} | "
                     f"{r['speedup_vs_fp16']:.2f} | {r.get('pct_of_floor', '-')} | {err} |")
    return "\n".join([*head, "", *lines]) + "\n"


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


def import_gemlite():
    """``(gemlite module or None, note)``: None with the reason when it is not installed or
    cannot be imported here (gemlite asks torch for the GPU's compute capability at import,
    which raises without a CUDA driver)."""
    try:
        import gemlite
    except Exception as e:  # noqa: BLE001 - any import failure means: skip gemlite, say why
        return None, f"gemlite not benchmarked: {type(e).__name__}: {e}"[:300]
    return gemlite, f"gemlite {getattr(gemlite, '__version__', '?')}"


def plan_methods(wanted: list[str], gemlite_ok: bool) -> list[str]:
    """The methods to time, in ``METHODS`` order: ``wanted`` without the gemlite ones when
    gemlite is unavailable. Unknown names: ValueError naming them and the allowed ones."""
    unknown = [w for w in wanted if w not in METHODS]
    if unknown:
        raise ValueError(f"--methods: unknown {unknown}; allowed: {list(METHODS)}")
    return [m for m in METHODS if m in wanted and (gemlite_ok or m not in GEMLITE)]


def gemlite_weight(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                   group: int = GROUP) -> torch.Tensor:
    """gemlite's grouped asymmetric weight, ``W = (W_q - zeros) * scales`` per group of
    ``group`` inputs (its ``dequantize``, W_group_mode 3/4), in fp32: codes (N, K),
    scales / zeros (N, K / group)."""
    return (codes.float() - zeros.float().repeat_interleave(group, 1)) * \
        scales.float().repeat_interleave(group, 1)


class GemliteLayer:
    """A packed gemlite ``GemLiteLinear`` as the benchmark calls it, with its weight for
    :func:`rel_error` (codes kept for the first copy only)."""

    def __init__(self, gemlite, bits: int, k: int, n: int, dev: str, keep_codes: bool) -> None:
        DType, GemLiteLinear = gemlite.DType, gemlite.GemLiteLinear  # noqa: N806
        codes = torch.randint(0, 2 ** bits, (n, k), device=dev, dtype=torch.uint8)
        scales = torch.rand(n, k // GROUP, device=dev, dtype=torch.float16) * 0.01
        zeros = torch.full((n, k // GROUP), 2 ** (bits - 1), device=dev, dtype=torch.float16)
        self.layer = GemLiteLinear(bits, group_size=GROUP, in_features=k, out_features=n,
                                   input_dtype=DType.FP16, output_dtype=DType.FP16)
        self.layer.pack(codes, scales, zeros, None)
        self._w = (codes, scales, zeros) if keep_codes else None
        if keep_codes:
            self.dequantize = lambda: gemlite_weight(*self._w)

    def __call__(self, x):
        return self.layer(x)


def _builders(dev: str) -> dict:
    """One builder per non-gemlite method: ``(nn.Linear copy) -> callable``."""
    from torch.nn import functional as F

    from qtrain.nn.packed import PackedLinear

    kw = {"backend": "triton"}

    def tinygemm(lin):
        n, k = lin.weight.shape
        wq = torch.randint(0, 16, (n, k), device=dev, dtype=torch.int32)
        w4 = torch.ops.aten._convert_weight_to_int4pack(
            (wq[:, ::2] << 4 | wq[:, 1::2]).to(torch.uint8), 8)
        sz = torch.randn(k // GROUP, n, 2, device=dev, dtype=torch.bfloat16)
        return lambda x: torch.ops.aten._weight_int4pack_mm(x.bfloat16(), w4, GROUP, sz)

    def pq(lin):
        n, k = lin.weight.shape
        codes = torch.randint(0, 256, (n, k // 8), device=dev, dtype=torch.uint8)
        cents = torch.randn(256, 8, device=dev, dtype=torch.float16) * 0.02
        return PackedLinear.from_codebook(codes, cents, **kw)

    def fp16(lin):
        w16 = lin.weight.detach().half()
        return lambda x: F.linear(x, w16)

    return {
        "fp16_cublas": fp16,
        "torch_int4_tinygemm": tinygemm,
        "qtrain_int8_channel": lambda lin: PackedLinear.from_linear(lin, 8, None, True, **kw),
        "qtrain_int4_g128": lambda lin: PackedLinear.from_linear(lin, 4, GROUP, False, **kw),
        "qtrain_int2_g128": lambda lin: PackedLinear.from_linear(lin, 2, GROUP, False, **kw),
        "qtrain_ternary": lambda lin: PackedLinear.from_linear_ternary(lin, **kw),
        "qtrain_binary": lambda lin: PackedLinear.from_linear_binary(lin, **kw),
        "qtrain_pq_bs8_k256": pq,
        "qtrain_w8a8": lambda lin: PackedLinear.from_linear_w8a8(lin, **kw),
    }


def build_methods(k: int, n: int, dev: str, methods, gemlite=None) -> dict:
    """COPIES callables for each of ``methods``, each copy with its own weights. A method
    whose layers fail to build maps to the exception (the others still run)."""
    from torch import nn

    builders = _builders(dev)
    out: dict = {}
    lins = [nn.Linear(k, n, bias=False, device=dev, dtype=torch.float32) for _ in range(COPIES)]
    for name in methods:
        try:
            if name in GEMLITE:
                out[name] = [GemliteLayer(gemlite, GEMLITE[name], k, n, dev, keep_codes=i == 0)
                             for i in range(COPIES)]
            else:
                out[name] = [builders[name](lin) for lin in lins]
        except Exception as e:  # noqa: BLE001 - one method's failure skips only its rows
            out[name] = e
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "bench_kernels.json"))
    ap.add_argument("--shapes", default=",".join(f"{k}x{n}" for k, n in SHAPES))
    ap.add_argument("--ms", default=",".join(map(str, MS)))
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--table", nargs="+", metavar="JSON",
                    help="print a markdown table of these result files and exit (no GPU)")
    args = ap.parse_args(argv)
    if args.table:
        rows = [r for path in args.table for r in json.loads(open(path).read())]
        print(table(rows), end="")
        return 0
    if not torch.cuda.is_available():
        print("bench_kernels: needs a CUDA GPU (no numbers on CPU)", file=sys.stderr)
        return 2
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    ms = [int(v) for v in args.ms.split(",")]
    wanted = plan_methods(args.methods.split(","), gemlite_ok=True)
    gpu = torch.cuda.get_device_name()
    peak = peak_bandwidth_gbs(gpu)
    gemlite, gl_note = import_gemlite() if any(m in GEMLITE for m in wanted) else (None, None)
    rows = [{"kind": "env", "gpu": gpu, "torch": torch.__version__, "peak_gbs": peak,
             "copies": COPIES, "replays": REPLAYS, "gemlite": gl_note}]
    print(json.dumps(rows[0]), flush=True)
    if gl_note and gemlite is None:
        rows.append({"kind": "note", "gemlite": gl_note})
        print(json.dumps(rows[-1]), flush=True)
    wanted = plan_methods(wanted, gemlite_ok=gemlite is not None)
    run = list(dict.fromkeys(["fp16_cublas", *wanted]))  # fp16: every row's baseline
    for k, n in shapes:
        meths = build_methods(k, n, "cuda", run, gemlite)
        for name, err in [(a, b) for a, b in meths.items() if isinstance(b, Exception)]:
            rows.append({"kind": name, "K": k, "N": n, "error": repr(err)[:300]})
            print(json.dumps(rows[-1]), flush=True)
            del meths[name]
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            base = graph_us(meths["fp16_cublas"], x)
            for name, fns in meths.items():
                if name not in wanted:
                    continue
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
