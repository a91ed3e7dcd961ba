"""Benchmark: k-means codebooks and Quant-Noise training step, ours vs a baseline, one process.

1. k-means of a 3072x768 weight, K=256, block 8 (294,912 sub-vectors), 20 iterations:
   ours (qtrain.quant.kmeans: chunked matmul distances, Hamerly bounds, index_add update)
   vs a straightforward reference in the style of fairseq's ``EM`` (full distance matrix
   per chunk, then a Python loop over the centroids for the update step).
2. Training step (forward + backward + SGD) of a transformer-ish MLP (embedding + 4 blocks of
   Linear 512->2048->512): Quant-Noise int8, p=0.1, block 8, vs the plain float step.

Usage: python benchmarks/bench_codebooks.py [--out bench_codebooks.json] [--iters 20]
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch
import torch.nn.functional as F
from torch import nn

from qtrain.nn.fake_quant import QuantEmbedding, QuantLinear
from qtrain.nn.quant_noise import QuantNoiseQuantizer
from qtrain.quant import kmeans as KM


def reference_kmeans(x: torch.Tensor, k: int, n_iter: int, seed: int = 0):
    """fairseq-style EM: chunked full distances, argmin, per-centroid Python update loop."""
    g = torch.Generator().manual_seed(seed)
    c = x[torch.randperm(x.shape[0], generator=g)[:k]].clone()
    for _ in range(n_iter):
        d = torch.cat([torch.cdist(xs, c) for xs in x.split(32768)])
        a = d.argmin(1)
        for j in range(k):  # the update step of fairseq's EM
            members = x[a == j]
            if len(members):
                c[j] = members.mean(0)
    return c, a


def bench_kmeans(n_iter: int) -> dict:
    torch.manual_seed(0)
    w = torch.randn(3072, 768)
    x = KM.blocks_of(w, 8)
    t = time.perf_counter()
    res = KM.kmeans(x, 256, n_iter, seed=0)
    ours = time.perf_counter() - t
    t = time.perf_counter()
    c_ref, a_ref = reference_kmeans(x, 256, n_iter, seed=0)
    ref = time.perf_counter() - t
    obj_ref = float(((x - c_ref[a_ref]) ** 2).sum())
    return {"kmeans_ours_s": ours, "kmeans_reference_s": ref, "kmeans_speedup": ref / ours,
            "objective_ours": res.objective[-1], "objective_reference": obj_ref}


class MLP(nn.Module):
    def __init__(self, vocab=1000, dim=512, depth=4):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(dim, 4 * dim), nn.ReLU(),
                                                  nn.Linear(4 * dim, dim)) for _ in range(depth))
        self.head = nn.Linear(dim, vocab)

    def forward(self, idx):
        h = self.emb(idx)
        for b in self.blocks:
            h = h + b(h)
        return self.head(h)


def _noisy(model: MLP, p: float) -> MLP:
    model.emb = QuantEmbedding.from_float(model.emb, QuantNoiseQuantizer(p=p, seed=1))
    for i, b in enumerate(model.blocks):
        for j in (0, 2):
            b[j] = QuantLinear.from_float(b[j], QuantNoiseQuantizer(p=p, seed=10 * i + j))
    model.head = QuantLinear.from_float(model.head, QuantNoiseQuantizer(p=p, seed=99))
    return model


def _step_time(model, idx, steps=10, warmup=3) -> float:
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    times = []
    for s in range(warmup + steps):
        t = time.perf_counter()
        loss = F.cross_entropy(model(idx).flatten(0, 1), idx.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if s >= warmup:
            times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]  # median


def bench_quant_noise(rounds: int = 3) -> dict:
    torch.manual_seed(0)
    idx = torch.randint(0, 1000, (16, 64))
    plain, noisy = MLP(), _noisy(MLP(), 0.1)
    tp, tn = [], []
    for _ in range(rounds):  # interleave to share machine noise
        tp.append(_step_time(plain, idx))
        tn.append(_step_time(noisy, idx))
    p, n = min(tp), min(tn)
    return {"step_plain_s": p, "step_quant_noise_s": n, "quant_noise_ratio": n / p}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench_codebooks.json")
    ap.add_argument("--iters", type=int, default=20)
    args = ap.parse_args()
    out = {"machine": f"{platform.processor() or platform.machine()}, "
                      f"{torch.get_num_threads()} torch threads", "torch": torch.__version__}
    out.update(bench_kmeans(args.iters))
    print(f"k-means 3072x768 K=256 bs=8 {args.iters} it: ours {out['kmeans_ours_s']:.2f} s, "
          f"reference {out['kmeans_reference_s']:.2f} s, speed-up {out['kmeans_speedup']:.1f}x "
          f"(objective {out['objective_ours']:.0f} vs {out['objective_reference']:.0f})")
    out.update(bench_quant_noise())
    print(f"train step: plain {1e3 * out['step_plain_s']:.1f} ms, quant-noise "
          f"{1e3 * out['step_quant_noise_s']:.1f} ms, ratio {out['quant_noise_ratio']:.3f}x")
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
