"""Ahead-of-time compile check of the Triton kernels for real GPUs, on a machine without one.

The CPU tests run the kernels under Triton's interpreter, which accepts code a GPU compiler
may reject and says nothing about registers or shared memory. This module compiles the
kernels the way a GPU run would launch them -- through the project's own host functions
(``lowbit_linear``, ``codebook_linear``, ``w8a8_linear``, ``bitserial_matmul``), with their
GPU default launch configurations or an explicit autotune candidate -- for a named target
(``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))``: Triton's bundled
ptxas turns the PTX into a cubin), then reads the cubin's resource usage with the bundled
``cuobjdump -res-usage`` (registers per thread, local memory = spills, static shared
memory) and Triton's metadata (shared memory per block including the pipeline buffers).

How a launch is captured: inside :func:`record_gpu_launches` every ``DualKernel`` launch is
recorded instead of run, and the host code takes its GPU branch (``interpreting`` is False,
autotuning off so the GPU default configuration is used unless ``config=`` is given).
Arguments are specialised as Triton's JIT does at launch: an int argument equal to 1
becomes a constant, pointers and ints divisible by 16 get the 16-divisibility attribute.

Limits per target (per block): sm_80 164 KiB and sm_90 228 KiB of shared memory (227 KiB
usable by one block on sm_90; we use the issue's 228 KiB), 255 registers per thread.

Occupancy (issue 17): every report also gives the resident blocks per SM its registers, shared
memory and threads allow (:attr:`CompileReport.blocks_per_sm`); :func:`occupancy_problems`
lists the launches that fit fewer than ``MIN_BLOCKS_PER_SM`` = 2 -- the GPU defaults and the
autotune candidates must not (``--full`` checks both, ``--table`` writes the table,
benchmarks/kernel_occupancy.md). These are compile-time numbers, not GPU measurements.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

from . import bitserial, codebook_matmul, lowbit_matmul, runtime, w8a8

TARGETS = {"sm_80": 80, "sm_90": 90}
SHARED_LIMIT = {80: 164 * 1024, 90: 228 * 1024}
# per SM (sm_80, sm_90 alike): 64K 32-bit registers, allocated per warp in units of 256;
# 2048 threads; 32 resident blocks; 1 KiB of shared memory reserved by the driver per block
# (Nsight Compute's "Driver Shared Memory")
REGS_PER_SM, REG_UNIT, THREADS_PER_SM, MAX_BLOCKS_PER_SM = 65536, 256, 2048, 32
RESERVED_SHARED_PER_BLOCK = 1024
MIN_BLOCKS_PER_SM = 2  # issue 17: candidates and defaults fit at least two blocks per SM
_MODULES = (runtime, lowbit_matmul, codebook_matmul, w8a8, bitserial)
_DTYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32",
          torch.int32: "i32", torch.int8: "i8", torch.uint8: "u8", torch.int64: "i64"}


@dataclass
class Launch:
    """One kernel launch as the host code issued it (plain python function, args, kwargs)."""

    fn: Callable
    args: tuple
    kwargs: dict
    label: str = ""

    @property
    def name(self) -> str:
        cfg = {k: v for k, v in self.kwargs.items() if k.startswith("BLOCK") or k in (
            "SPLIT_K", "num_warps", "num_stages")}
        return f"{self.fn.__name__}[{self.label}]{cfg}"


@dataclass
class CompileReport:
    launch: Launch
    target: int
    seconds: float
    registers: int = -1
    local_bytes: int = -1   # per thread: register spills (and local arrays)
    shared_bytes: int = -1  # per block: Triton's metadata (pipeline buffers included)
    num_warps: int = 4
    error: str | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def blocks_per_sm(self) -> int:
        """Resident blocks per SM allowed by registers (64K per SM, allocated per warp in
        units of 256), shared memory (the SM's capacity: sm_80 164 KiB, sm_90 228 KiB, each
        block using its own plus 1 KiB reserved by the driver), threads (2048 per SM) and the
        32-block limit: what CUDA's occupancy calculator gives for these resources."""
        if self.error:
            return 0
        per_warp = -(-max(self.registers, 1) * 32 // REG_UNIT) * REG_UNIT
        by_regs = REGS_PER_SM // (per_warp * self.num_warps)
        by_shared = SHARED_LIMIT[self.target] // (self.shared_bytes + RESERVED_SHARED_PER_BLOCK)
        return max(0, min(by_regs, by_shared, THREADS_PER_SM // (32 * self.num_warps),
                          MAX_BLOCKS_PER_SM))

    def line(self) -> str:
        head = f"sm_{self.target} {self.launch.name}"
        if self.error:
            return f"{head}: COMPILE ERROR {self.error}"
        return (f"{head}: {self.registers} regs, {self.local_bytes} B local, "
                f"{self.shared_bytes} B shared, {self.blocks_per_sm} blocks/SM, "
                f"{self.seconds:.1f} s"
                + (f"  <- {'; '.join(self.problems)}" if self.problems else ""))


class _Recorder:
    def __init__(self, fn: Callable, out: list[Launch], label: str) -> None:
        self.fn, self.out, self.label = fn, out, label

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.out.append(Launch(self.fn, args, dict(kwargs), self.label))
        return launch


@contextlib.contextmanager
def record_gpu_launches(label: str = "") -> Iterator[list[Launch]]:
    """Within the block, kernel launches are recorded (not run) and host code takes its GPU
    branch with autotuning off; CPU tensors stand in for device tensors."""
    launches: list[Launch] = []
    saved = [(m, m.__dict__.get("interpreting")) for m in _MODULES]
    old_getitem = runtime.DualKernel.__getitem__
    old_env = os.environ.get("QTRAIN_AUTOTUNE")
    runtime.DualKernel.__getitem__ = lambda self, device: _Recorder(self.fn, launches, label)
    for m, f in saved:
        if f is not None:
            m.interpreting = lambda device: False
    os.environ["QTRAIN_AUTOTUNE"] = "0"
    try:
        yield launches
    finally:
        runtime.DualKernel.__getitem__ = old_getitem
        for m, f in saved:
            if f is not None:
                m.interpreting = f
        if old_env is None:
            os.environ.pop("QTRAIN_AUTOTUNE", None)
        else:
            os.environ["QTRAIN_AUTOTUNE"] = old_env


def _source(launch: Launch) -> tuple[ASTSource, dict]:
    jit = JITFunction(launch.fn)  # not triton.jit: under TRITON_INTERPRET=1 that interprets
    sig, const, attrs = {}, {}, {}
    pos = list(launch.args)
    for i, name in enumerate(jit.arg_names):
        if name in launch.kwargs:
            sig[name], const[name] = "constexpr", launch.kwargs[name]
            continue
        if i >= len(pos):
            raise ValueError(f"{launch.fn.__name__}: argument {name!r} was not passed")
        a = pos[i]
        if isinstance(a, torch.Tensor):
            sig[name] = "*" + _DTYPE[a.dtype]
            if a.data_ptr() % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(a, bool):
            sig[name] = "i1"
        elif isinstance(a, int):
            if a == 1:  # the JIT specialises 1 into a constant
                sig[name], const[name] = "constexpr", 1
                continue
            sig[name] = "i32" if -2**31 <= a < 2**31 else "i64"
            if a % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(a, float):
            sig[name] = "fp32"
        else:
            raise TypeError(f"{launch.fn.__name__}: argument {name!r} of type {type(a).__name__}")
    opts = {k: launch.kwargs[k] for k in ("num_warps", "num_stages") if k in launch.kwargs}
    return ASTSource(jit, sig, const, attrs), opts


_RES = re.compile(r"REG:(\d+) STACK:(\d+).*?LOCAL:(\d+)")


def _resource_usage(cubin: bytes) -> tuple[int, int]:
    """(registers per thread, local memory bytes per thread) of the cubin's kernel, by the
    bundled ``cuobjdump -res-usage``: the stack frame (where ptxas puts register spills) plus
    LOCAL. Checked against ``ptxas -v`` on a spilling fp32 GEMM: STACK 9568 B for 19980 B of
    spill stores."""
    import triton.backends.nvidia as nv

    tool = os.path.join(os.path.dirname(nv.__file__), "bin", "cuobjdump")
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        out = subprocess.run([tool, "-res-usage", path], capture_output=True, text=True,
                             check=True).stdout
    m = _RES.search(out)
    if m is None:
        raise RuntimeError(f"cuobjdump -res-usage gave no resource line:\n{out}")
    return int(m.group(1)), int(m.group(2)) + int(m.group(3))


def compile_launch(launch: Launch, target: int) -> CompileReport:
    """Compile ``launch`` for ``sm_<target>``; the report lists spills (local memory) and
    shared memory over the target's per-block limit as problems. Runs in this process, which
    must not have imported triton under ``TRITON_INTERPRET=1`` (:func:`check` takes care)."""
    t0 = time.time()
    try:
        src, opts = _source(launch)
        ck = triton.compile(src, target=GPUTarget("cuda", target, 32), options=opts)
        regs, local = _resource_usage(ck.asm["cubin"])
    except Exception as e:  # noqa: BLE001 - reported as the check's finding
        msg = str(e).strip().splitlines()
        return CompileReport(launch, target, time.time() - t0,
                             error=f"{type(e).__name__}: {msg[-1] if msg else ''}")
    rep = CompileReport(launch, target, time.time() - t0, regs, local, int(ck.metadata.shared),
                        num_warps=int(opts.get("num_warps", 4)))
    if local:
        rep.problems.append(f"spills {local} B/thread to local memory")
    if rep.shared_bytes > SHARED_LIMIT[target]:
        rep.problems.append(f"shared {rep.shared_bytes} B > {SHARED_LIMIT[target]} B limit")
    return rep


def ok(report: CompileReport) -> bool:
    return report.error is None and not report.problems


def occupancy_problems(reports: list[CompileReport],
                       min_blocks: int = MIN_BLOCKS_PER_SM) -> list[str]:
    """One line per compiled launch that fits fewer than ``min_blocks`` blocks per SM."""
    return [f"{r.line()}  <- {r.blocks_per_sm} block(s)/SM < {min_blocks}"
            for r in reports if r.error is None and r.blocks_per_sm < min_blocks]


_CONFIG_KEYS = {"BLOCK_M": "BM", "BLOCK_N": "BN", "BLOCK_K": "BK", "BLOCK_W": "BW",
                "SPLIT_K": "SK", "num_warps": "W", "num_stages": "S"}


def config_text(cfg: dict) -> str:
    """Launch configuration in short form, e.g. ``BM16 BN64 BK128 SK1 W4 S3`` (the tables'
    config column; other keys of ``cfg`` -- a launch's flags -- are left out)."""
    return " ".join(f"{short}{cfg[k]}" for k, short in _CONFIG_KEYS.items() if k in cfg)


# -- the launches to check ------------------------------------------------------------------

def _lowbit_args(m: int, n: int, k: int, bits: int, group: int | None, zeros: str | None,
                 mode: str = "affine", dtype=torch.float16, bias: bool = False,
                 lut_rows: int = 1) -> tuple[tuple, dict]:
    from .layout import container_bits, pack_codes

    c = container_bits(bits)
    hi = 1 if mode == "binary" else 2 ** bits - 1
    codes = torch.randint(0, hi + 1, (n, k), dtype=torch.int32)
    g = k if group is None else group
    scales = torch.rand(n, k // g, dtype=torch.float16)
    z = None
    if zeros == "uint8":
        z = torch.randint(0, 2 ** c, (n, k // g), dtype=torch.uint8)
    elif zeros is not None:
        z = torch.rand(n, k // g, dtype=getattr(torch, zeros))
    kw = {"bits": bits, "k": k, "mode": mode}
    if mode == "lut":
        kw["lut"] = torch.rand(lut_rows, 2 ** c, dtype=torch.float16)
    x = torch.randn(m, k, dtype=dtype)
    b = torch.randn(n, dtype=dtype) if bias else None
    return (x, pack_codes(codes, c), scales, z, b), kw


LOWBIT_CASES = {  # label: (bits, group, zeros, mode, dtype, bias)
    "int8-channel": (8, None, None, "affine", torch.float16, False),
    "int4-g128-u8zp-bias": (4, 128, "uint8", "affine", torch.float16, True),
    "int2-g64-fp16zp": (2, 64, "float16", "affine", torch.float16, False),
    "binary-channel": (1, None, None, "binary", torch.float16, False),
    "lut3-row": (3, None, None, "lut", torch.float16, False),
    "int4-g128-u8zp-bf16": (4, 128, "uint8", "affine", torch.bfloat16, False),
    "int4-g128-u8zp-fp32": (4, 128, "uint8", "affine", torch.float32, False),
}


def lowbit_launches(ms=(1, 64, 512), cases=None, config: dict | None = None) -> list[Launch]:
    """``lowbit_linear`` launches (GEMV for M = 1, GEMM above) at N = 256, K = 1024."""
    out: list[Launch] = []
    for label, (bits, group, zeros, mode, dtype, bias) in (cases or LOWBIT_CASES).items():
        for m in ms:
            args, kw = _lowbit_args(m, 256, 1024, bits, group, zeros, mode, dtype, bias,
                                    lut_rows=256 if mode == "lut" else 1)
            with record_gpu_launches(f"lowbit {label} M={m}") as rec:
                lowbit_matmul.lowbit_linear(*args, **kw, config=config)
            out += rec
    return out


def codebook_launches(ms=(1, 64), block_sizes=(8, 9), config: dict | None = None,
                      dtype=torch.float16) -> list[Launch]:
    out: list[Launch] = []
    for bs in block_sizes:
        k = 1152 if bs == 9 else 1024
        codes = torch.randint(0, 256, (256, k // bs), dtype=torch.uint8)
        cents = torch.rand(256, bs, dtype=torch.float16)
        for m in ms:
            with record_gpu_launches(f"codebook bs={bs} M={m} {dtype}") as rec:
                codebook_matmul.codebook_linear(torch.randn(m, k, dtype=dtype), codes,
                                                cents, config=config)
            out += rec
    return out


def w8a8_launches(ms=(64,), config: dict | None = None) -> list[Launch]:
    out: list[Launch] = []
    q = torch.randint(-127, 128, (256, 1024), dtype=torch.int8)
    s = torch.rand(256, dtype=torch.float32)
    for m in ms:
        with record_gpu_launches(f"w8a8 M={m}") as rec:
            w8a8.w8a8_linear(torch.randn(m, 1024, dtype=torch.float16), q, s, config=config)
        out += rec
    return out


def bitserial_launches(bits=((4, 4), (2, 2)), config: dict | None = None) -> list[Launch]:
    out: list[Launch] = []
    for abits, wbits in bits:
        xp = torch.randint(-2**31, 2**31 - 1, (abits, 64, 32), dtype=torch.int32)
        wp = torch.randint(-2**31, 2**31 - 1, (wbits, 256, 32), dtype=torch.int32)
        with record_gpu_launches(f"bitserial {abits}x{wbits}") as rec:
            bitserial.bitserial_matmul(xp, wp, 1024, config=config)
        out += rec
    return out


def default_launches() -> list[Launch]:
    """Every kernel entry point with its GPU default configuration over a representative set
    of flags: bit widths and modes, per-channel and grouped scales, integer and float
    zero-points, bias, fp16 / bf16 / fp32 activations, GEMV (M = 1) and GEMM (M = 16 -- the
    decode default --, 64, 512)."""
    decode = {k: LOWBIT_CASES[k] for k in ("int4-g128-u8zp-bias", "int4-g128-u8zp-bf16")}
    return (lowbit_launches() + lowbit_launches((16,), decode) + codebook_launches()
            + codebook_launches((16,), (8,))
            + codebook_launches((64,), (8,), dtype=torch.float32) + w8a8_launches()
            + bitserial_launches())


CANDIDATE_LISTS = ("lowbit_gemv", "lowbit_gemm", "codebook_gemv", "codebook_gemm", "w8a8")


def _list_launches(kind: str, configs: list[dict]) -> list[Launch]:
    """Launches of ``configs`` for the kernel of candidate list ``kind`` (CANDIDATE_LISTS):
    lowbit int4 g128 with uint8 zero-points (the GEMM also int8 per channel, the format the
    issue found at 255 registers), codebook bs 8, w8a8."""
    int4 = {"int4-g128-u8zp-bias": LOWBIT_CASES["int4-g128-u8zp-bias"]}
    both = {**int4, "int8-channel": LOWBIT_CASES["int8-channel"]}
    out: list[Launch] = []
    for cfg in configs:
        if kind == "lowbit_gemv":
            out += lowbit_launches((1,), int4, cfg)
        elif kind == "lowbit_gemm":
            out += lowbit_launches((64,), both, cfg)
        elif kind == "codebook_gemv":
            out += codebook_launches((1,), (8,), cfg)
        elif kind == "codebook_gemm":
            out += codebook_launches((64,), (8,), cfg)
        elif kind == "w8a8":
            out += [la for la in w8a8_launches((64,), cfg) if la.fn is w8a8._w8a8_body]
        else:
            raise ValueError(f"candidate list {kind!r}; allowed: {list(CANDIDATE_LISTS)}")
    return out


def candidate_lists() -> dict[str, list[dict]]:
    """The autotune candidate lists as the kernels define them now."""
    return {"lowbit_gemv": lowbit_matmul._GEMV_CANDIDATES,
            "lowbit_gemm": lowbit_matmul._GEMM_CANDIDATES,
            "codebook_gemv": codebook_matmul._GEMV_CANDIDATES,
            "codebook_gemm": codebook_matmul._GEMM_CANDIDATES, "w8a8": w8a8._CANDIDATES}


def candidate_launches(kinds=CANDIDATE_LISTS) -> list[Launch]:
    """Every autotune candidate of the lists ``kinds`` (default all) for representative
    formats (the fuller sweep; see ``_list_launches``)."""
    lists = candidate_lists()
    return [la for kind in kinds for la in _list_launches(kind, lists[kind])]


def named_launches() -> list[Launch]:
    """The explicit named configurations outside the autotune lists (``NAMED_CONFIGS``: the
    large 8-warp tiles dropped for fitting one block per SM), same formats as the lists."""
    return (_list_launches("lowbit_gemm", list(lowbit_matmul.NAMED_CONFIGS.values()))
            + _list_launches("codebook_gemm", list(codebook_matmul.NAMED_CONFIGS.values()))
            + _list_launches("w8a8", list(w8a8.NAMED_CONFIGS.values())))


def markdown_table(reports: list[CompileReport], targets=(80, 90)) -> str:
    """One row per launch: kernel, format, configuration, then per target registers per
    thread, spilled (local) bytes per thread, shared bytes per block, resident blocks per SM."""
    rows: dict[tuple, dict[int, CompileReport]] = {}
    for r in reports:
        key = (r.launch.fn.__name__, r.launch.label, config_text(r.launch.kwargs))
        rows.setdefault(key, {})[r.target] = r
    head = ["kernel", "format", "config"] + [
        f"sm_{t} {c}" for t in targets for c in ("regs", "spill B", "shared B", "blocks/SM")]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (fn, label, cfg), per in rows.items():
        cells = [fn, label, cfg]
        for t in targets:
            r = per.get(t)
            if r is None:
                cells += ["-"] * 4
            elif r.error:
                cells += ["error", "-", "-", "0"]
            else:
                cells += [str(r.registers), str(r.local_bytes), str(r.shared_bytes),
                          str(r.blocks_per_sm)]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def parse_markdown_table(text: str) -> list[dict[str, str]]:
    """Rows of the first table in ``text`` as dicts keyed by the header cells."""
    lines = [ln for ln in text.splitlines() if ln.startswith("|")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(head, (c.strip() for c in ln.strip("|").split("|")))) for ln in lines[2:]]


def _compile_one(job: tuple[Launch, int]) -> CompileReport:
    return compile_launch(*job)


def check(launches: list[Launch], targets=(80, 90), workers: int = 1) -> list[CompileReport]:
    """Compile every launch for every target in ``workers`` fresh processes; one report each
    (launch-major order)."""
    return check_jobs([(la, t) for la in launches for t in targets], workers)


def check_jobs(jobs: list[tuple[Launch, int]], workers: int = 1) -> list[CompileReport]:
    """Compile each ``(launch, target)`` in ``workers`` fresh processes; reports in order.

    The compiling processes are spawned with ``TRITON_INTERPRET`` unset: in a process where it
    was set before import (the CPU test suite), every ``@triton.jit`` helper is an interpreted
    function that no GPU compiler accepts. Launches are recorded in the calling process."""
    import concurrent.futures as cc_futures
    import multiprocessing as mp

    saved = os.environ.pop("TRITON_INTERPRET", None)
    try:
        with cc_futures.ProcessPoolExecutor(max(1, workers),
                                            mp_context=mp.get_context("spawn")) as ex:
            futures = [ex.submit(_compile_one, j) for j in jobs]
            return [f.result() for f in futures]
    finally:
        if saved is not None:
            os.environ["TRITON_INTERPRET"] = saved


TABLE_HEAD = """# Kernel registers, spills, shared memory and occupancy (compile-verified, not measured)

Written by `{command}` ({when}; triton {triton}, its bundled ptxas; N = 256, K = 1024).
Every number is from compiling for the named target on a CPU (`qtrain_kernels.compile_check`):
registers per thread and spilled (local) bytes per thread from `cuobjdump -res-usage`, shared
memory per block from Triton's metadata, blocks/SM = resident blocks per SM those allow
(64K registers allocated per warp in units of 256, the SM's shared memory with 1 KiB reserved
per block, 2048 threads, 32 blocks). No GPU ran these kernels: speed is not implied.
Rule (issue 17): the GPU defaults and autotune candidates compile without spills and fit at
least {min_blocks} blocks per SM on sm_80 and sm_90; the named large tiles below are outside
the autotune lists (explicit `config=` only).
"""


def write_table(path: str, sections: dict[str, list[CompileReport]], command: str,
                targets=(80, 90)) -> None:
    import datetime

    text = TABLE_HEAD.format(command=command, triton=triton.__version__,
                             when=datetime.date.today().isoformat(),
                             min_blocks=MIN_BLOCKS_PER_SM)
    for title, reps in sections.items():
        text += f"\n## {title}\n\n" + markdown_table(reps, targets)
    with open(path, "w") as f:
        f.write(text)


SECTIONS = {"defaults": "GPU default launch configurations",
            "candidates": "Autotune candidates",
            "named": "Named large tiles (explicit config only; not autotuned)"}


def main(argv: list[str] | None = None) -> int:
    """``python -m qtrain_kernels.compile_check [--full] [--target sm_80 sm_90] [--jobs N]
    [--table FILE]``: prints one line per compilation; exit status 1 on any error, spill or
    shared overflow, or a default / autotune candidate fitting fewer than two blocks per SM."""
    import argparse
    import sys

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--full", action="store_true",
                    help="every autotune candidate and named config as well")
    ap.add_argument("--target", nargs="+", default=list(TARGETS), choices=list(TARGETS))
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--table", help="write the markdown table of every compilation here")
    a = ap.parse_args(argv)
    groups = {"defaults": default_launches()}
    if a.full:
        groups |= {"candidates": candidate_launches(), "named": named_launches()}
    launches = [la for g in groups.values() for la in g]
    targets = [TARGETS[t] for t in a.target]
    reports = check(launches, targets, a.jobs)
    by_group, i = {}, 0
    for name, g in groups.items():
        by_group[name] = reports[i:i + len(g) * len(targets)]
        i += len(g) * len(targets)
    for r in reports:
        print(r.line(), flush=True)
    bad = [r.line() for r in reports if not ok(r)]
    low = [ln for name in ("defaults", "candidates") for ln in
           occupancy_problems(by_group.get(name, []))]
    for ln in low:
        print(ln)
    if a.table:
        cmd = "python -m qtrain_kernels.compile_check " + " ".join(
            sys.argv[1:] if argv is None else argv)
        write_table(a.table, {SECTIONS[k]: v for k, v in by_group.items()}, cmd.strip(),
                    tuple(targets))
    print(f"{len(reports)} compilations, {len(bad)} with problems, {len(low)} default / "
          f"candidate launches under {MIN_BLOCKS_PER_SM} blocks per SM")
    return 1 if bad or low else 0


if __name__ == "__main__":
    raise SystemExit(main())
