"""Kernel plumbing: CPU interpreter / GPU dispatch, input checks, per-GPU config cache.

* :class:`DualKernel` keeps one Triton function in two forms: the compiled ``triton.jit``
  kernel for CUDA tensors and ``InterpretedFunction`` (the same code run by Triton's
  interpreter, what ``TRITON_INTERPRET=1`` selects) for CPU tensors. So a CPU tensor runs the
  kernel's real code even on a machine with a GPU, and no environment variable has to be set
  before import.
* :class:`ConfigCache`: launch configurations chosen by timing on the real GPU are stored
  as JSON under ``~/.cache/qtrain/kernels-<gpu name>.json`` (override the folder with
  ``QTRAIN_CACHE_DIR``), keyed by kernel and problem shape; autotuning is skipped under the
  interpreter, while a CUDA graph is being captured (a default is used) and when
  ``QTRAIN_AUTOTUNE=0``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import triton
import triton.testing
from triton import knobs
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

ACT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def interpreting(device: torch.device) -> bool:
    return device.type != "cuda" or os.environ.get("TRITON_INTERPRET", "0") == "1"


_SUBCALLS: dict[int, InterpretedFunction] = {}


def _interpreted_subcall(self, *args, **kwargs):
    """``JITFunction.__call__`` while interpreting: run helpers (``tl.sum``, ``tl.cdiv``, our
    ``@triton.jit`` device functions) in the interpreter, as ``TRITON_INTERPRET=1`` would."""
    f = _SUBCALLS.get(id(self))
    if f is None:
        f = _SUBCALLS[id(self)] = InterpretedFunction(self.fn)
    return f(*args, **kwargs)


@contextlib.contextmanager
def _interpreter_scope():
    old_call, old_flag = JITFunction.__call__, knobs.runtime.interpret
    JITFunction.__call__ = _interpreted_subcall
    knobs.runtime.interpret = True
    try:
        yield
    finally:
        JITFunction.__call__ = old_call
        knobs.runtime.interpret = old_flag


class _CpuLauncher:
    def __init__(self, fn: InterpretedFunction) -> None:
        self.fn = fn

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            kwargs = {k: v for k, v in kwargs.items() if k not in ("num_warps", "num_stages")}
            with _interpreter_scope():
                return self.fn[grid](*args, **kwargs)
        return launch


class DualKernel:
    """``kernel[device][grid](*args)``: compiled on CUDA, interpreted on CPU.

    Works whether or not ``TRITON_INTERPRET=1`` was set before triton was imported (the
    lightning stack imports triton early): while the interpreted kernel runs, calls to
    already-compiled ``@triton.jit`` helpers are routed to the interpreter as well.
    """

    def __init__(self, fn: Callable) -> None:
        self.fn = fn
        self._cpu = _CpuLauncher(InterpretedFunction(fn))
        self._gpu = None

    def __getitem__(self, device: torch.device):
        if interpreting(device):
            return self._cpu
        if self._gpu is None:
            self._gpu = triton.jit(self.fn)
        return self._gpu


def dual_jit(fn: Callable) -> DualKernel:
    return DualKernel(fn)


def check_tensor(
    t: torch.Tensor, name: str, dtypes: Sequence[torch.dtype], device: torch.device,
    shape: tuple | None = None, contiguous: bool = True,
) -> None:
    """ValueError naming ``name`` if dtype, device or shape (``None`` entries = any) differ,
    or (``contiguous``) if it is not contiguous: the kernels index weights, scales, tables and
    bias as dense row-major arrays, so a broadcast view (stride 0) would read wrong values."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")  # noqa: TRY004
    if t.dtype not in dtypes:
        raise ValueError(f"{name} has dtype {t.dtype}; expected one of {list(dtypes)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}; expected {device} (same device as x)")
    if shape is not None:
        ok = t.dim() == len(shape) and all(e is None or e == s for e, s in zip(shape, t.shape))
        if not ok:
            want = ", ".join("*" if e is None else str(e) for e in shape)
            raise ValueError(f"{name} has shape {tuple(t.shape)}; expected ({want})")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name} is not contiguous (strides {t.stride()}); the kernels read it "
                         f"as a dense row-major array: pass {name}.contiguous()")


def as_2d(x: torch.Tensor, k: int) -> torch.Tensor:
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(f"x has shape {tuple(x.shape)}; expected last dimension K={k}")
    x2 = x.reshape(-1, k)
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def m_bucket(m: int) -> int:
    """Round M up to a power of two (capped at 1024) so a tuned config serves nearby M."""
    b = 1
    while b < m and b < 1024:
        b *= 2
    return b


class ConfigCache:
    """Per-GPU JSON cache of the fastest launch configuration per (kernel, shape) key."""

    def __init__(self) -> None:
        self._mem: dict[str, dict] = {}
        self._loaded: set[str] = set()

    @staticmethod
    def path(gpu_name: str) -> Path:
        root = Path(os.environ.get("QTRAIN_CACHE_DIR", Path.home() / ".cache" / "qtrain"))
        return root / f"kernels-{re.sub(r'[^A-Za-z0-9_.-]+', '_', gpu_name)}.json"

    def _file(self, gpu_name: str) -> dict:
        p = self.path(gpu_name)
        if gpu_name not in self._loaded:
            self._loaded.add(gpu_name)
            if p.exists():
                try:
                    self._mem.update({f"{gpu_name}|{k}": v for k, v in json.loads(p.read_text()).items()})
                except (OSError, ValueError):
                    pass  # a corrupt cache is rebuilt, never fatal
        return {k.split("|", 1)[1]: v for k, v in self._mem.items() if k.startswith(gpu_name + "|")}

    def get(self, gpu_name: str, key: str) -> dict | None:
        return self._file(gpu_name).get(key)

    def put(self, gpu_name: str, key: str, cfg: dict) -> None:
        entries = self._file(gpu_name)
        entries[key] = cfg
        self._mem[f"{gpu_name}|{key}"] = cfg
        p = self.path(gpu_name)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_suffix(".tmp")
        tmp.write_text(json.dumps(entries, indent=1, sort_keys=True))
        tmp.replace(p)


CACHE = ConfigCache()


def choose_config(
    key: str, device: torch.device, candidates: Sequence[dict], default: dict,
    run: Callable[[dict], None],
) -> dict:
    """Fastest of ``candidates`` for ``key`` on this GPU (timed once, then cached)."""
    if interpreting(device) or os.environ.get("QTRAIN_AUTOTUNE", "1") == "0":
        return default
    gpu = torch.cuda.get_device_name(device)
    hit = CACHE.get(gpu, key)
    if hit is not None:
        return hit
    if torch.cuda.is_current_stream_capturing():
        return default  # cannot time inside a graph capture; tune before capturing
    best, best_t = default, float("inf")
    for cfg in candidates:
        try:
            t = triton.testing.do_bench(lambda cfg=cfg: run(cfg), warmup=5, rep=20)
        except Exception:  # noqa: BLE001, S112 - a config that fails to compile is skipped
            continue
        if t < best_t:
            best, best_t = cfg, t
    CACHE.put(gpu, key, best)
    return best


# The GEMV kernel runs one program per row: each row re-reads the packed weights, so M rows
# cost M passes over them. From M = 2 the GEMM kernel's 16-row tiles read each weight once
# for up to 16 rows (the batch sizes of LLM decoding); its small-M default splits K so that
# a 4096-wide layer still has 256 programs (tests/kernels/test_weight_reads.py counts the
# loads under the interpreter).
GEMV_MAX_M = 1
SMALL_M_GEMM_DEFAULT = {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128, "SPLIT_K": 4,
                        "num_warps": 4, "num_stages": 3}


def gemm_candidates_for(m: int, candidates: Sequence[dict]) -> list[dict]:
    """The GEMM candidates worth timing at M = ``m``: BLOCK_M 16 up to M = 32, 32-64 up to
    M = 256, 64-256 above (a tile much taller than M wastes the tensor cores, a much shorter
    one re-reads the weights); all of them when none fits."""
    b = m_bucket(m)
    lo, hi = (16, 16) if b <= 32 else (32, 64) if b <= 256 else (64, 256)
    return [c for c in candidates if lo <= c["BLOCK_M"] <= hi] or list(candidates)


def fp32_gemm_default(m: int) -> dict:
    """GPU GEMM default for fp32 activations. ``tl.dot(..., input_precision="ieee")`` on fp32
    tiles runs on FMA units with 4-byte operands, so the fp16 defaults (64-128 x 128 x 64)
    spill 10-20 KB per thread (ptxas, sm_80 and sm_90); these tiles compile without spills
    (``qtrain_kernels.compile_check``: 203-235 registers, 13 KB shared)."""
    if m <= 256:
        return {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 32, "SPLIT_K": 1, "num_warps": 4,
                "num_stages": 2}
    return {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 16, "SPLIT_K": 1, "num_warps": 4,
            "num_stages": 3}


def splitk_linear(
    x: torch.Tensor, x2: torch.Tensor, weights: Sequence, sizes: Sequence[int], n: int, k: int,
    bias: torch.Tensor | None, *, gemv: DualKernel, gemm: DualKernel, flags: dict, name: str,
    key_extra: str, candidates: tuple[Sequence[dict], Sequence[dict]], gemm_default: dict,
    config: dict | None, per_config: Callable[[dict], dict] | None = None,
) -> torch.Tensor:
    """Host side of a weight-only ``y = x @ W^T (+ bias)`` with a split-K GEMV / GEMM pair.

    ``x2`` is ``x`` as (M, K) (:func:`as_2d`). Both kernels take ``(x, *weights, bias, y, M,
    N, K, *sizes, stride_xm)`` (``weights[1]`` stands in for an absent bias; it is never read)
    plus ``HAS_BIAS``, ``flags`` and the launch configuration:
    the GEMV kernel (M <= ``GEMV_MAX_M``, or a ``config`` without BLOCK_M) on grid ``(cdiv(N, BLOCK_N), M, SPLIT_K)``, the GEMM
    kernel on ``(cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N), SPLIT_K)``. With ``SPLIT_K > 1`` the
    output is a zeroed fp32 workspace the splits ``atomic_add`` into. ``config=None`` picks
    the launch configuration by :func:`choose_config` over ``candidates`` (GEMV, GEMM) under
    the cache key ``{name}|gemv|M..|N..|K..|{key_extra}|{x.dtype}`` (``gemm_default`` is the
    GPU default for the GEMM; the interpreter uses small blocks).
    """
    dev = x.device
    if bias is not None:
        check_tensor(bias, "bias", ACT_DTYPES, dev, (n,))
    m = x2.shape[0]
    interp = interpreting(dev)
    xin = x2.float() if (interp and x2.dtype == torch.bfloat16) else x2  # interp: no bf16 dot
    # an explicit config picks its kernel (a GEMV config has no BLOCK_M; tests force it)
    small = m <= GEMV_MAX_M if config is None else "BLOCK_M" not in config

    def launch(cfg: dict) -> torch.Tensor:
        split = cfg["SPLIT_K"]
        derived = per_config(cfg) if per_config is not None else {}
        y = (torch.zeros if split > 1 else torch.empty)(
            m, n, device=dev, dtype=torch.float32 if split > 1 else xin.dtype)
        args = (xin, *weights, bias if bias is not None else weights[1], y, m, n, k, *sizes,
                xin.stride(0))
        if small:
            grid = (triton.cdiv(n, cfg["BLOCK_N"]), m, split)
            gemv[dev][grid](*args, HAS_BIAS=bias is not None, **flags, **derived, **cfg)
        else:
            grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]), split)
            gemm[dev][grid](*args, HAS_BIAS=bias is not None, **flags, **derived, **cfg)
        return y

    if config is None:
        if small:
            default = ({"BLOCK_N": 16, "BLOCK_K": 32, "SPLIT_K": 1} if interp else
                       {"BLOCK_N": 32, "BLOCK_K": 256, "SPLIT_K": 4, "num_warps": 4})
        elif interp:
            default = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32, "SPLIT_K": 1}
        else:
            default = fp32_gemm_default(m) if xin.dtype == torch.float32 else gemm_default
        kind = "gemv" if small else "gemm"
        key = f"{name}|{kind}|M{m_bucket(m)}|N{n}|K{k}|{key_extra}|{x.dtype}"
        cands = candidates[0] if small else gemm_candidates_for(m, candidates[1])
        config = choose_config(key, dev, cands, default, launch)
    return launch(config).to(x.dtype).reshape(*x.shape[:-1], n)
