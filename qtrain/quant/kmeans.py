"""Vectorised k-means, scalar k-means codebooks, product and residual quantization.

k-means (Lloyd): alternate an assignment step (nearest centroid, computed with chunked
distance matmuls ``||x||^2 - 2 x c^T + ||c||^2`` on the tensor's device) and an update step
(weighted mean of each cluster, one ``index_add_`` for all clusters). Initialisation
(``init``): ``'random'`` (default) -- K distinct rows sampled with a seeded generator;
``'linear'`` (scalar data only, d = 1) -- K values equally spaced between the minimum and
the maximum of the data (Han et al. 2016, "Deep Compression", sec. 3.2: linear
initialisation gave the best accuracy since it keeps the few large weights represented). Empty clusters (Stock et al. 2019,
"And the Bit Goes Down", sec. 3.3 / fairseq ``EM``): the most populated cluster is split,
its centroid ``c`` becoming ``c + e`` and ``c - e`` (``e`` small seeded noise), and its
points are re-assigned between the two. The recorded objective (after each assignment
step) never increases: the mean update and the split followed by the mean update can only
lower the sum of squared distances.

Activation-aware objective (Stock et al. 2019, eq. (2)-(3)): instead of ``||W - W_hat||^2``
minimise ``||x (W - W_hat)||^2`` for sampled layer inputs ``x``. As in kill-the-bits, the
input is reshaped into sub-vectors of the same ``block_size`` as the weight and all
block positions are pooled, so every sub-vector ``w`` uses the same distance
``(w - c)^T H (w - c)`` with ``H = sum_j X_j^T X_j`` (``X_j``: the input columns of block
position j). With ``H = L L^T`` this is plain k-means on ``z = w L``; the update step (the
least-squares centroid) is still the cluster mean, as in the paper. Simplification: the
exact objective would need one ``H_j`` per block position (block-diagonal) and a
``d x d`` solve per centroid; we use the pooled ``H`` of the paper.

Product quantization (Jegou et al. 2011; Stock 2019): a weight reshaped to
``(out, in_flat)`` (conv: ``in * kh * kw``, so 3x3 blocks of 9 are whole kernels) is cut
into sub-vectors of ``block_size`` consecutive input columns, one codebook per layer.
Residual quantization (Chen et al. 2010 / Martinez 2014): M stages, each a k-means
codebook fitted on the residual left by the previous stages.

Backends (``backend``) -- initialisation, empty-cluster split, iteration count and
objective are this module's in every case, so both give the same centroids and assignments
from the same seed (up to exact distance ties and the float summation order of the update):

* ``'torch'``: :func:`assign` above, on the tensor's device (CPU or GPU).
* ``'faiss'``: exact nearest-centroid search of faiss-cpu (``faiss.knn``, Johnson et al.
  2019, "Billion-scale similarity search"; its fused distance + argmin kernel for small
  ``d``), about 4x faster than the torch search on CPU for PQ's ``d = 8``. CPU tensors only;
  uses ``torch.get_num_threads()`` threads. faiss-cpu is an optional extra
  (``pip install faiss-cpu``). Without ``sample_weight`` the whole Lloyd loop runs in
  faiss's C++ ``Clustering`` (assignment + update; ~12% less CPU than faiss's search inside
  our Python loop on the 294,912 x 8, K = 256 problem: benchmarks/kmeans_bench.py), set up
  to be this module's algorithm: our initial centroids, every point (no subsampling:
  ``max_points_per_centroid = n``), the same iteration count. faiss splits an empty cluster
  its own way (a random cluster scaled by ``1 +- 1/1024``), not fairseq's split used here,
  so a run in which faiss reports a split is redone with this module's loop (faiss search,
  torch update): the fairseq behaviour is kept exactly.
* ``'auto'`` (default): ``'faiss'`` for CPU tensors when faiss is importable, else
  ``'torch'``. The process-wide default comes from the environment variable
  ``QTRAIN_KMEANS_BACKEND`` (``auto`` when unset).

Identical-seed DDP: both searches are exact and deterministic (faiss splits the rows
between threads, each row's result does not depend on the split), so every rank with the
same data, seed and backend computes the same codebook.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from qtrain.errors import ConfigError
from qtrain.quant import uniform as U

_CHUNK_ELEMS = 1 << 21  # distance-matrix elements per chunk (8 MB in fp32: cache-sized)
INITS = ("random", "linear")
BACKENDS = ("auto", "torch", "faiss")
BACKEND_ENV = "QTRAIN_KMEANS_BACKEND"


def _check_x(x: torch.Tensor, n_centroids: int, name: str) -> None:
    if x.dim() != 2:
        raise ValueError(f"{name}: k-means expects a 2-D (n, d) tensor, got shape {tuple(x.shape)}")
    if not isinstance(n_centroids, int) or n_centroids < 1:
        raise ConfigError(f"{name}: n_centroids must be a positive int, got {n_centroids!r}")
    if n_centroids > x.shape[0]:
        raise ConfigError(
            f"{name}: n_centroids={n_centroids} is larger than the number of sub-vectors "
            f"{x.shape[0]}; use n_centroids <= {x.shape[0]} or a smaller block_size"
        )
    if not torch.isfinite(x).all():
        raise ValueError(f"{name}: tensor to cluster contains NaN or inf")


def assign(x: torch.Tensor, centroids: torch.Tensor, chunk_elems: int = _CHUNK_ELEMS,
           second: bool = False):
    """Nearest centroid (squared Euclidean) of every row of ``x``.

    Returns (assignments, squared distances) and, with ``second=True``, also the squared
    distance to the second-nearest centroid. Rows are processed in chunks so that the
    distance matrix never exceeds ``chunk_elems`` elements; one chunk buffer is reused
    (written by ``addmm(out=)``, reduced by ``min(out=)``), which keeps it cache-resident
    and avoids a fresh allocation (page faults) per chunk: 2-3x faster on CPU than
    allocating the distance matrix.
    """
    n, k = x.shape[0], centroids.shape[0]
    c_sq = (centroids * centroids).sum(1).unsqueeze(0)
    ct = centroids.t().contiguous()
    rows = min(n, max(1, chunk_elems // max(k, 1)))
    buf = torch.empty(rows, k, dtype=x.dtype, device=x.device)
    idx = torch.empty(n, dtype=torch.long, device=x.device)
    dist = torch.empty(n, dtype=x.dtype, device=x.device)
    dist2 = torch.empty(n, dtype=x.dtype, device=x.device) if second else None
    for s in range(0, n, rows):
        xs = x[s : s + rows]
        m = xs.shape[0]
        d = buf[:m]
        torch.addmm(c_sq, xs, ct, alpha=-2.0, out=d)  # ||c||^2 - 2 x.c
        if second and k > 1:
            vals, inds = d.topk(2, dim=1, largest=False)
            idx[s : s + m] = inds[:, 0]
            dist[s : s + m] = vals[:, 0]
            dist2[s : s + m] = vals[:, 1]
        else:
            torch.min(d, dim=1, out=(dist[s : s + m], idx[s : s + m]))
            if second:
                dist2[s : s + m] = float("inf")
    x_sq = (x * x).sum(1)
    dist.add_(x_sq).clamp_min_(0)
    if second:
        dist2.add_(x_sq).clamp_min_(0)
    return (idx, dist, dist2) if second else (idx, dist)


def _faiss():
    """The faiss module, or None when faiss-cpu is not installed."""
    try:
        import faiss
    except ImportError:
        return None
    return faiss


def faiss_available() -> bool:
    return _faiss() is not None


def resolve_backend(backend: str | None, device: torch.device, name: str = "kmeans") -> str:
    """``'torch'`` or ``'faiss'`` for a k-means on ``device`` (see the module docstring).

    ``backend=None``: the environment variable ``QTRAIN_KMEANS_BACKEND`` (default 'auto').
    """
    key = "backend"
    if backend is None:
        backend, key = os.environ.get(BACKEND_ENV, "auto"), BACKEND_ENV
    if backend not in BACKENDS:
        raise ConfigError(f"{name}: k-means {key}={backend!r}; allowed: {BACKENDS}")
    cpu = torch.device(device).type == "cpu"
    if backend == "auto":
        return "faiss" if cpu and faiss_available() else "torch"
    if backend == "faiss":
        if not faiss_available():
            raise ConfigError(f"{name}: k-means {key}='faiss' needs faiss-cpu, which is not "
                              "installed: pip install faiss-cpu (or use 'auto' / 'torch')")
        if not cpu:
            raise ConfigError(f"{name}: k-means {key}='faiss' runs on CPU tensors only, the "
                              f"data is on {device}; use 'auto' or 'torch'")
    return backend


def assign_faiss(x: torch.Tensor, centroids: torch.Tensor):
    """:func:`assign` (nearest centroid, squared distance) by faiss-cpu's exact search.

    ``x`` and ``centroids`` are float32 CPU tensors; runs on ``torch.get_num_threads()``
    threads (faiss' OpenMP setting is restored afterwards).
    """
    faiss = _faiss()
    xn = x.detach().float().contiguous().numpy()
    cn = centroids.detach().float().contiguous().numpy()
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(torch.get_num_threads())
    try:
        dist, idx = faiss.knn(xn, cn, 1)
    finally:
        faiss.omp_set_num_threads(before)
    return torch.from_numpy(idx).view(-1), torch.from_numpy(dist).view(-1).clamp_min_(0)


@dataclass
class KMeansResult:
    centroids: torch.Tensor  # (K, d)
    assignments: torch.Tensor  # (n,) long
    objective: list  # weighted sum of squared distances after each assignment step


def _generator(seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(int(seed))


def kmeans(
    x: torch.Tensor,
    n_centroids: int = 256,
    n_iter: int = 20,
    seed: int = 0,
    sample_weight: torch.Tensor | None = None,
    metric: torch.Tensor | None = None,
    eps: float = 1e-6,
    name: str = "kmeans",
    chunk_elems: int = _CHUNK_ELEMS,
    init: str = "random",
    backend: str | None = None,
    split_empty: bool = True,
) -> KMeansResult:
    """Weighted k-means of the rows of ``x`` (n, d) on ``x``'s device.

    Args:
        n_centroids: K (<= n).
        n_iter: Lloyd iterations (assignment + update).
        seed: seeds initialisation and empty-cluster noise (CPU generator: identical results
            on every rank of a distributed run).
        sample_weight: optional (n,) non-negative weights: minimises
            ``sum_i s_i ||x_i - c_{a_i}||^2`` (update = weighted mean).
        metric: optional (d, d) PSD matrix H: distance ``(x - c)^T H (x - c)``
            (activation-aware objective, see module docstring).
        eps: scale of the empty-cluster split noise (relative to the data's std).
        name: layer name used in error messages.
        init: 'random' (K sampled rows) or 'linear' (d = 1 only: ``linspace(min, max, K)``).
        backend: assignment step 'auto' | 'torch' | 'faiss' (module docstring); None: the
            environment variable ``QTRAIN_KMEANS_BACKEND``, default 'auto'.
        split_empty: re-seed an empty cluster by splitting the most populated one (module
            docstring; default). ``False``: plain Lloyd -- an empty cluster keeps its centroid
            (it may stay unused; e.g. a linear-init centroid in the gap that pruning leaves
            around 0, Deep Compression).
    """
    _check_x(x, n_centroids, name)
    if init not in INITS:
        raise ConfigError(f"{name}: k-means init={init!r}; allowed: {INITS}")
    if init == "linear" and x.shape[1] != 1:
        raise ConfigError(f"{name}: k-means init='linear' needs scalar data (d = 1), got "
                          f"d = {x.shape[1]}; use init='random'")
    use_faiss = resolve_backend(backend, x.device, name) == "faiss"
    n, d = x.shape
    orig_dtype = x.dtype
    x = x.detach().float()
    g = _generator(seed)
    w = None
    if sample_weight is not None:
        w = sample_weight.detach().float().to(x.device).reshape(-1)
        if w.numel() != n or (w < 0).any():
            raise ValueError(f"{name}: sample_weight must be (n,) = ({n},) and non-negative")
    lin = None
    if metric is not None:
        lin = metric_factor(metric.to(x.device), name)
        x = x @ lin  # z = x L: Euclidean distance in z == metric distance in x
    x = x.contiguous()

    if init == "linear":
        centroids = torch.linspace(float(x.min()), float(x.max()), n_centroids,
                                   device=x.device).reshape(-1, 1)
    else:
        centroids = x[torch.randperm(n, generator=g)[:n_centroids].to(x.device)].clone()
    done = _faiss_lloyd(x, centroids, max(1, n_iter)) if use_faiss and w is None else None
    if done is not None:
        centroids, a, history = done
        if lin is not None:
            centroids = torch.linalg.solve_triangular(lin, centroids, upper=False, left=False)
        return KMeansResult(centroids.to(orig_dtype), a, history)
    xw = x if w is None else x * w[:, None]  # weighted sums of the update step
    noise_scale = eps * float(x.std()) if n > 1 else eps
    noise_scale = noise_scale if noise_scale > 0 else eps
    history: list[float] = []
    for it in range(max(1, n_iter) + 1):
        # Plain Lloyd: one full chunked assignment per iteration. Bound-based pruning
        # (Hamerly 2010) was measured slower here: it needs the second-nearest distance
        # (top-2, ~2.5x the cost of min on CPU) and for K=256 in 8-D ~40% of the points stay
        # candidates after 20 iterations.
        a, sq = assign_faiss(x, centroids) if use_faiss else assign(x, centroids, chunk_elems)
        history.append(float(sq.sum() if w is None else (sq * w).sum()))
        if it == max(1, n_iter):
            break
        if split_empty:
            a, _ = _split_empty(x, centroids, a, w, noise_scale, g)
        centroids = _update(x, a, w, centroids, xw)
    if lin is not None:
        centroids = torch.linalg.solve_triangular(lin, centroids, upper=False, left=False)
    return KMeansResult(centroids.to(orig_dtype), a, history)


def _faiss_lloyd(x: torch.Tensor, init: torch.Tensor, n_iter: int):
    """``n_iter`` Lloyd iterations from ``init`` in faiss's ``Clustering`` on every point,
    then the final assignment: (centroids, assignments, objective per assignment) as the
    torch loop returns them -- or None when faiss had to split an empty cluster (the caller
    then runs this module's loop, which splits as fairseq does)."""
    faiss = _faiss()
    n, d = x.shape
    k = init.shape[0]
    xn = x.numpy()
    params = faiss.ClusteringParameters()
    params.niter = n_iter
    params.max_points_per_centroid = n  # every point, as this module (default: 256 per centroid)
    params.min_points_per_centroid = 1  # no "too few points" warning: K <= n is checked above
    clus = faiss.Clustering(d, k, params)
    faiss.copy_array_to_vector(init.contiguous().numpy().reshape(-1), clus.centroids)
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(torch.get_num_threads())
    try:
        index = faiss.IndexFlatL2(d)
        clus.train(xn, index)
        stats = [clus.iteration_stats.at(i) for i in range(clus.iteration_stats.size())]
        if any(s.nsplit for s in stats):
            return None
        dist, idx = index.search(xn, 1)
    finally:
        faiss.omp_set_num_threads(before)
    centroids = torch.from_numpy(faiss.vector_to_array(clus.centroids).reshape(k, d).copy())
    history = [float(s.obj) for s in stats] + [float(dist.sum(dtype="float64"))]
    return centroids, torch.from_numpy(idx.reshape(-1)).long(), history


def _counts(a: torch.Tensor, k: int, w: torch.Tensor | None) -> torch.Tensor:
    if w is None:
        return torch.bincount(a, minlength=k).float()
    return torch.zeros(k, device=a.device).index_put_((a,), w, accumulate=True)


def _update(x, a, w, old, xw=None):
    """Weighted mean of each cluster; a cluster with zero total weight keeps its centroid.

    ``xw``: ``x * w[:, None]`` precomputed (or ``x`` when unweighted). The per-cluster sums
    use ``index_put_(accumulate=True)``: on CPU a serial, row-ordered accumulation (the
    same sums as ``index_add_``, bit for bit; on CPU over float pairs viewed as complex64),
    1.6x faster than ``index_add_`` for (n, 8) rows; on GPU sort-based (deterministic,
    unlike ``index_add_``'s atomics).
    """
    k = old.shape[0]
    if xw is None:
        xw = x if w is None else x * w[:, None]
    if xw.device.type == "cpu" and xw.dtype == torch.float32 and xw.shape[1] % 2 == 0:
        # pairs of floats as complex64: half the elements, componentwise the same float adds
        sums = torch.zeros(k, xw.shape[1] // 2, dtype=torch.complex64).index_put_(
            (a,), xw.contiguous().view(torch.complex64), accumulate=True)
        sums = torch.view_as_real(sums).reshape(k, -1)
    else:
        sums = torch.zeros_like(old).index_put_((a,), xw, accumulate=True)
    cnt = _counts(a, k, w)
    return torch.where(cnt[:, None] > 0, sums / cnt.clamp_min(1e-30)[:, None], old)


def _split_empty(x, centroids, a, w, noise_scale, g):
    """Split the most populated cluster into every empty one (modifies ``centroids``).

    Returns (assignments, indices of the re-assigned points or None).
    """
    k = centroids.shape[0]
    pop = torch.bincount(a, minlength=k)
    empty = (pop == 0).nonzero().flatten().tolist()
    moved = []
    for e in empty:  # loop over empty clusters only (rare), not over points
        big = int(pop.argmax())
        if pop[big] < 2:
            break
        noise = (torch.randn(centroids.shape[1], generator=g) * noise_scale).to(x.device)
        c = centroids[big].clone()
        centroids[e], centroids[big] = c + noise, c - noise
        members = (a == big).nonzero().flatten()
        xm = x[members]
        to_e = ((xm - centroids[e]) ** 2).sum(1) < ((xm - centroids[big]) ** 2).sum(1)
        a[members[to_e]] = e
        pop[e], pop[big] = int(to_e.sum()), int((~to_e).sum())
        moved.append(members)
    return a, (torch.cat(moved) if moved else None)


def metric_factor(metric: torch.Tensor, name: str = "kmeans") -> torch.Tensor:
    """Lower-triangular ``C`` with ``H = C C^T``, so that ``x H x^T = ||x C||^2`` (row x).

    H is symmetrised and regularised by 1e-6 * mean diagonal so that it is positive definite.
    """
    if metric.dim() != 2 or metric.shape[0] != metric.shape[1]:
        raise ValueError(f"{name}: metric must be a square (d, d) matrix, got {tuple(metric.shape)}")
    h = metric.float()
    h = 0.5 * (h + h.t())
    reg = 1e-6 * float(h.diagonal().mean().abs()) + 1e-12
    chol = torch.linalg.cholesky(h + reg * torch.eye(h.shape[0], device=h.device))  # H = C C^T
    return chol


# ----------------------------------------------------------------------------------------
# codebook formats
# ----------------------------------------------------------------------------------------


def blocks_of(weight: torch.Tensor, block_size: int, name: str = "weight") -> torch.Tensor:
    """Sub-vectors (out * in_flat / bs, bs) of ``block_size`` consecutive input columns."""
    return U.grouped(weight, block_size, name, "block_size").reshape(-1, block_size)


def pooled_input_metric(inputs: torch.Tensor, block_size: int, name: str = "inputs"):
    """Pooled block covariance ``H = sum_j X_j^T X_j`` (bs, bs) of layer inputs (n, in_flat).

    For a conv layer pass the unfolded patches (``F.unfold``) transposed to (n*L, in*kh*kw).
    Normalised by the number of rows (scale does not change the k-means solution).
    """
    if inputs.dim() != 2 or inputs.shape[1] % block_size:
        raise ConfigError(
            f"{name}: sample inputs of shape {tuple(inputs.shape)} do not split into blocks "
            f"of block_size={block_size}"
        )
    xb = inputs.detach().float().reshape(inputs.shape[0], -1, block_size)
    return torch.einsum("njd,nje->de", xb, xb) / inputs.shape[0]


def pq_fit(
    weight: torch.Tensor,
    block_size: int,
    n_centroids: int = 256,
    n_iter: int = 20,
    seed: int = 0,
    sample_inputs: torch.Tensor | None = None,
    row_weight: torch.Tensor | None = None,
    name: str = "weight",
    backend: str | None = None,
) -> KMeansResult:
    """Product quantization of a weight: one codebook (K, bs) and one index per block.

    ``sample_inputs`` (n, in_flat): activation-aware objective with the pooled metric.
    ``row_weight`` (out,): weight of every block of a row (e.g. token frequency for an
    embedding table). Returns KMeansResult with assignments of shape (out * in_flat / bs,).
    """
    x = blocks_of(weight, block_size, name)
    metric = None if sample_inputs is None else pooled_input_metric(sample_inputs, block_size, name)
    sw = None
    if row_weight is not None:
        sw = row_weight.float().to(x.device).repeat_interleave(x.shape[0] // weight.shape[0])
    return kmeans(x, n_centroids, n_iter, seed, sample_weight=sw, metric=metric, name=name,
                  backend=backend)


def pq_reconstruct(centroids: torch.Tensor, assignments: torch.Tensor, shape) -> torch.Tensor:
    """The weight of ``shape`` rebuilt from its PQ codebook: ``centroids[assignments]``."""
    return centroids[assignments].reshape(shape)


def pq_storage_bits(n_blocks: int, n_centroids: int, block_size: int) -> int:
    """ceil(log2 K) bits per block index + K * bs centroids in fp16 (Stock 2019, sec. 4)."""
    return n_blocks * max(1, math.ceil(math.log2(n_centroids))) + 16 * n_centroids * block_size


def scalar_kmeans(weight: torch.Tensor, bits: int, n_iter: int = 20, seed: int = 0,
                  name: str = "weight", init: str = "random", n_centroids: int | None = None,
                  backend: str | None = None, split_empty: bool = True):
    """Scalar k-means codebook (weight sharing, Han et al. 2015 sec. 3): 2^bits shared values.

    ``init='linear'``: centroids start equally spaced in [min, max] (the paper's best
    initialisation, sec. 3.2). ``n_centroids``: fewer than 2^bits shared values (a layer
    with fewer weights than 2^bits). ``split_empty``: :func:`kmeans`. Returns (codebook (K,),
    codes shaped like ``weight`` (long)).
    """
    if not isinstance(bits, int) or not 1 <= bits <= 16:
        raise ConfigError(f"{name}: scalar k-means bits={bits!r} not supported; allowed 1..16")
    k = 2**bits if n_centroids is None else n_centroids
    if not isinstance(k, int) or not 1 <= k <= 2**bits:
        raise ConfigError(f"{name}: scalar k-means n_centroids={n_centroids!r}; allowed "
                          f"1..2^bits = {2**bits}")
    res = kmeans(weight.reshape(-1, 1), k, n_iter, seed, name=name, init=init, backend=backend,
                 split_empty=split_empty)
    return res.centroids.reshape(-1), res.assignments.reshape(weight.shape)


def rq_fit(weight: torch.Tensor, block_size: int, n_stages: int = 2, n_centroids: int = 256,
           n_iter: int = 20, seed: int = 0, name: str = "weight", backend: str | None = None):
    """Residual quantization: ``n_stages`` codebooks, stage m fitted on the residual of 1..m-1.

    Returns (list of centroids (K, bs), list of assignments); reconstruct with
    :func:`rq_reconstruct`.
    """
    if not isinstance(n_stages, int) or n_stages < 1:
        raise ConfigError(f"{name}: n_stages must be a positive int, got {n_stages!r}")
    residual = blocks_of(weight, block_size, name).detach().float()
    books, codes = [], []
    for m in range(n_stages):
        res = kmeans(residual, n_centroids, n_iter, seed + m, name=f"{name}[stage {m}]",
                     backend=backend)
        books.append(res.centroids)
        codes.append(res.assignments)
        residual = residual - res.centroids[res.assignments]
    return books, codes


def rq_reconstruct(books, codes, shape) -> torch.Tensor:
    out = sum(c[a] for c, a in zip(books, codes))
    return out.reshape(shape)
