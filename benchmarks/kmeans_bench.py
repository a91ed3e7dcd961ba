"""Benchmark: k-means for PQ codebooks, one process, old torch path vs new paths vs faiss-cpu.

Problem (issue 15): a 3072x768 weight cut into blocks of 8 (294,912 sub-vectors of d = 8),
K = 256, 20 Lloyd iterations, then the assignment of every sub-vector to the final centroids.
Variants, timed round by round in one process (``timing.interleaved_times``, order
reversed every other round, median of the rounds), at 1 and 2 threads
(``torch.set_num_threads`` and faiss' OpenMP threads):

* ``old_torch``: the k-means of ``qtrain.quant.kmeans`` before the faiss backend (copied
  below: chunked matmul assignment, ``index_add_`` update, fairseq's empty-cluster split).
* ``new_torch``: ``KM.kmeans(backend='torch')`` (GPU / no-faiss path).
* ``new_faiss``: ``KM.kmeans(backend='faiss')``: the same Lloyd (init, split, update,
  iterations) with faiss' exact search as the assignment step -- what ``backend='auto'``
  runs on CPU when faiss-cpu is installed.
* ``faiss_kmeans``: the library itself, ``faiss.Kmeans(niter=20)`` on all points
  (``max_points_per_centroid`` large enough that it does not subsample) + one search for
  the final assignments. ``faiss_kmeans_same_init``: the same, started from our initial
  centroids. ``faiss_kmeans_subsampled``: faiss' default, which trains on 256 points per
  centroid (65,536 of the 294,912) -- a different, cheaper problem, listed for reference.

Objectives: the final sum of squared distances of every variant. Times: wall-clock and the
process CPU time (``time.process_time``, all threads); on a shared machine the CPU time of
a 1-thread run is the steadier measure of the work done.

Layer stack: PQ (``KM.pq_fit``, K = 256, 20 iterations, iPQ's default block sizes: 4 for
attention projections, 8 for the feed-forward layers) of every linear layer of a
MiniLM-L12-H384-shaped encoder (12 x [query, key, value, attention output 384x384;
intermediate 1536x384; output 384x1536]; Gaussian weights), old path vs ``backend='auto'``.

Usage: nice -n 19 python benchmarks/kmeans_bench.py [--rounds 3] [--stack-rounds 2]
       [--out benchmarks/kmeans_bench.json]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import timing  # noqa: E402

from qtrain.quant import kmeans as KM  # noqa: E402

K, BLOCK, N_ITER, SEED = 256, 8, 20, 0


def old_kmeans(x: torch.Tensor, n_centroids: int, n_iter: int, seed: int = 0, eps: float = 1e-6):
    """qtrain.quant.kmeans.kmeans before commit 6dfea07 (unweighted, no metric; the branches
    this problem uses): ``KM.assign`` (unchanged since), ``index_add_`` update."""
    x = x.detach().float()
    n = x.shape[0]
    g = torch.Generator().manual_seed(seed)
    noise_scale = eps * float(x.std())
    centroids = x[torch.randperm(n, generator=g)[:n_centroids]].clone()
    history = []
    for it in range(n_iter + 1):
        a, sq = KM.assign(x, centroids)
        history.append(float(sq.sum()))
        if it == n_iter:
            break
        a, _ = KM._split_empty(x, centroids, a, None, noise_scale, g)
        sums = torch.zeros_like(centroids).index_add_(0, a, x)
        cnt = torch.bincount(a, minlength=n_centroids).float()
        centroids = torch.where(cnt[:, None] > 0, sums / cnt.clamp_min(1e-30)[:, None], centroids)
    return centroids, a, history


def faiss_kmeans(faiss, x, init=None, subsample=False):
    xn = x.numpy()
    n, d = xn.shape
    kw = {} if subsample else {"max_points_per_centroid": n // K + 1}
    km = faiss.Kmeans(d, K, niter=N_ITER, seed=SEED + 1, **kw)
    km.train(xn, init_centroids=None if init is None else init.numpy())
    dist, _ = km.index.search(xn, 1)
    return float(dist.sum())


def bench_problem(threads: int, rounds: int, faiss) -> dict:
    torch.set_num_threads(threads)
    if faiss is not None:
        faiss.omp_set_num_threads(threads)
    torch.manual_seed(0)
    x = KM.blocks_of(torch.randn(3072, 768), BLOCK).contiguous()
    g = torch.Generator().manual_seed(SEED)
    init = x[torch.randperm(x.shape[0], generator=g)[:K]].clone()  # KM.kmeans' init
    obj: dict[str, float] = {}
    cpu: dict[str, list[float]] = {}

    def rec(name, fn):
        def run():
            t0 = time.process_time()
            obj[name] = fn()
            cpu.setdefault(name, []).append(time.process_time() - t0)
        return run

    runs = {
        "old_torch": rec("old_torch", lambda: old_kmeans(x, K, N_ITER, SEED)[2][-1]),
        "new_torch": rec("new_torch", lambda: KM.kmeans(x, K, N_ITER, SEED, backend="torch").objective[-1]),
    }
    if faiss is not None:
        runs["new_faiss"] = rec("new_faiss", lambda: KM.kmeans(x, K, N_ITER, SEED, backend="faiss").objective[-1])
        runs["faiss_kmeans"] = rec("faiss_kmeans", lambda: faiss_kmeans(faiss, x))
        runs["faiss_kmeans_same_init"] = rec("faiss_kmeans_same_init", lambda: faiss_kmeans(faiss, x, init))
        runs["faiss_kmeans_subsampled"] = rec("faiss_kmeans_subsampled",
                                              lambda: faiss_kmeans(faiss, x, subsample=True))
    times = timing.interleaved_times(runs, warmup=1, rounds=rounds, alternate=True)
    med = timing.medians(times)
    cpu_med = {k: statistics.median(v[1:]) for k, v in cpu.items()}  # v[0]: the warmup round
    out = {"threads": threads, "seconds_median": med, "seconds_all": times,
           "cpu_seconds_median": cpu_med, "objective": obj}
    if faiss is not None:
        ref_t, ref_o = med["faiss_kmeans"], obj["faiss_kmeans"]
        out["time_vs_faiss_kmeans"] = {k: v / ref_t for k, v in med.items()}
        out["cpu_time_vs_faiss_kmeans"] = {k: v / cpu_med["faiss_kmeans"] for k, v in cpu_med.items()}
        out["objective_rel_diff_vs_faiss_kmeans"] = {k: v / ref_o - 1 for k, v in obj.items()}
    out["speedup_new_auto_vs_old"] = med["old_torch"] / med["new_faiss" if faiss else "new_torch"]
    return out


def minilm_stack(layers: int = 12, dim: int = 384, ffn: int = 1536):
    """(name, weight, block size) of every linear layer of a MiniLM-L12-H384 encoder."""
    torch.manual_seed(1)
    out = []
    for i in range(layers):
        p = f"encoder.layer.{i}."
        for n in ("attention.self.query", "attention.self.key", "attention.self.value",
                  "attention.output.dense"):
            out.append((p + n, torch.randn(dim, dim) * dim**-0.5, 4))
        out.append((p + "intermediate.dense", torch.randn(ffn, dim) * dim**-0.5, 8))
        out.append((p + "output.dense", torch.randn(dim, ffn) * ffn**-0.5, 8))
    return out


def bench_stack(threads: int, rounds: int) -> dict:
    torch.set_num_threads(threads)
    stack = minilm_stack()
    obj: dict[str, float] = {}
    cpu: dict[str, list[float]] = {"old_torch": [], "new_auto": []}

    def old():
        t0 = time.process_time()
        obj["old_torch"] = sum(old_kmeans(KM.blocks_of(w, bs), K, N_ITER, i)[2][-1]
                               for i, (_, w, bs) in enumerate(stack))
        cpu["old_torch"].append(time.process_time() - t0)

    def new():
        t0 = time.process_time()
        obj["new_auto"] = sum(KM.pq_fit(w, bs, K, N_ITER, seed=i, backend="auto", name=n).objective[-1]
                              for i, (n, w, bs) in enumerate(stack))
        cpu["new_auto"].append(time.process_time() - t0)

    times = timing.interleaved_times({"old_torch": old, "new_auto": new}, warmup=0,
                                     rounds=rounds, alternate=True)
    med = timing.medians(times)
    return {"threads": threads, "layers": len(stack),
            "sub_vectors": sum(w.numel() // bs for _, w, bs in stack),
            "backend_auto_resolves_to": KM.resolve_backend("auto", torch.device("cpu")),
            "seconds_median": med, "seconds_all": times, "objective_sum": obj,
            "cpu_seconds_median": {k: statistics.median(v) for k, v in cpu.items()},
            "speedup": med["old_torch"] / med["new_auto"],
            "cpu_speedup": statistics.median(cpu["old_torch"]) / statistics.median(cpu["new_auto"])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--stack-rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, nargs="*", default=[1, 2])
    ap.add_argument("--stack-threads", type=int, default=1)
    ap.add_argument("--out", default="benchmarks/kmeans_bench.json")
    ap.add_argument("--machine", default="", help="free-text note, e.g. 'shared 2-core VM'")
    args = ap.parse_args()
    faiss = KM._faiss()
    res = {"problem": f"294,912 x {BLOCK} (3072x768 weight, block {BLOCK}), K={K}, "
                      f"{N_ITER} iterations + final assignment",
           "torch": torch.__version__, "faiss": getattr(faiss, "__version__", None),
           "platform": platform.platform(), "processor": platform.processor(),
           "machine_note": args.machine, "problem_runs": []}
    for t in args.threads:
        r = bench_problem(t, args.rounds, faiss)
        res["problem_runs"].append(r)
        print(f"threads={t}: " + ", ".join(
            f"{k} {v:.3f}s (cpu {r['cpu_seconds_median'][k]:.3f}s) obj {r['objective'][k]:.1f}"
            for k, v in r["seconds_median"].items()), flush=True)
    if args.stack_rounds > 0:
        s = bench_stack(args.stack_threads, args.stack_rounds)
        res["layer_stack"] = s
        print(f"MiniLM stack ({s['layers']} layers, threads={s['threads']}): "
              f"old {s['seconds_median']['old_torch']:.1f}s, new {s['seconds_median']['new_auto']:.1f}s "
              f"({s['speedup']:.2f}x); CPU {s['cpu_seconds_median']} ({s['cpu_speedup']:.2f}x); "
              f"objectives {s['objective_sum']}", flush=True)
    timing.write_json(args.out, res, indent=1)
    print(f"medians of {args.rounds} (problem) / {args.stack_rounds} (stack) rounds -> {args.out}")


if __name__ == "__main__":
    main()
