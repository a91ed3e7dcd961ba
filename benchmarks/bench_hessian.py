"""Per-layer Hessian traces of a CIFAR resnet20: shared-sample Hutchinson vs per-layer loops.

Side by side in one process (same model, batch, threads):

1. reference  -- per-layer Hutchinson (block H_ll alone) to a tight relative standard error
                 ``--ref-tol`` (the "high-sample reference");
2. shared     -- qtrain.hessian.trace.hutchinson_traces: every layer from the same full-model
                 Hv products, until every layer reaches ``--tol`` (or ``--shared-max-iter``);
3. loop       -- qtrain.hessian.trace.per_layer_traces: one Hutchinson run per layer to
                 ``--tol`` (PyHessian's approach, our code);
4. pyhessian  -- PyHessian itself (``hessian(...).trace``), one object per layer with only that
                 layer's weight requiring grad, run for the same number of samples as (3).

Prints per-layer estimates, the share within 10% of the reference, times and time ratios,
plus the measured single-sample relative std of both estimators and the number of samples
the shared estimator would need for ``--tol`` ((rel std / tol)^2); writes JSON.

    /work/venv/bin/python benchmarks/bench_hessian.py --batch 8 --tol 0.05 --ref-tol 0.03
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch
import torch.nn.functional as F
from timing import timed, write_json
from torch import nn

from qtrain.hessian.hvp import HessianOperator, batch_losses, hessian_mode, layer_groups
from qtrain.hessian.trace import hutchinson_traces, per_layer_traces

try:
    from qtrain.models.resnet_cifar import resnet20
except ImportError:  # the lead's model zoo not there: compact option-A resnet20
    class _Block(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.pad, self.stride = cout - cin, stride

        def forward(self, x):
            out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
            sc = x[:, :, :: self.stride, :: self.stride]
            sc = F.pad(sc, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
            return F.relu(out + sc)

    class _ResNet20(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16)
            blocks, cin = [], 16
            for i, w in enumerate((16, 32, 64)):
                for j in range(3):
                    blocks.append(_Block(cin, w, 2 if i and not j else 1))
                    cin = w
            self.blocks, self.fc = nn.Sequential(*blocks), nn.Linear(64, 10)

        def forward(self, x):
            x = self.blocks(F.relu(self.bn1(self.conv1(x))))
            return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))

    def resnet20():
        return _ResNet20()


def cifar_batch(n: int, seed: int):
    """n real CIFAR-10 train images (../shared/data) normalised, else Gaussian noise."""
    path = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10" / "train_jpeg.npz"
    g = torch.Generator().manual_seed(seed)
    if path.exists():
        import io

        import numpy as np
        from PIL import Image

        d = np.load(path)
        idx = torch.randperm(len(d["labels"]), generator=g)[:n].tolist()
        off, raw = d["offsets"], d["jpeg"]
        ends = list(off[1:]) + [len(raw)]
        imgs = [np.asarray(Image.open(io.BytesIO(raw[off[i]:ends[i]].tobytes())).convert("RGB"))
                for i in idx]
        x = torch.tensor(np.stack(imgs)).permute(0, 3, 1, 2).float() / 255
        mean = torch.tensor([0.491, 0.482, 0.447])[:, None, None]
        std = torch.tensor([0.247, 0.243, 0.262])[:, None, None]
        return (x - mean) / std, torch.tensor(d["labels"][idx]).long(), "cifar10"
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g), "noise"


def pyhessian_loop(model, x, y, names, iters):
    try:
        from pyhessian import hessian
    except Exception as e:  # noqa: BLE001
        return None, f"pyhessian failed to import: {e!r}"
    mods = dict(model.named_modules())
    flags = {p: p.requires_grad for p in model.parameters()}
    out = {}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        for n in names:
            for p in model.parameters():
                p.requires_grad_(p is mods[n].weight)
            h = hessian(model, nn.CrossEntropyLoss(), data=(x, y), cuda=False)
            samples = h.trace(maxIter=iters[n], tol=0.0)  # tol 0: exactly iters[n] samples
            out[n] = float(sum(samples) / len(samples))
            model.zero_grad(set_to_none=True)
    finally:
        for p, f in flags.items():
            p.requires_grad_(f)
        model.load_state_dict(state)
    return out, None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tol", type=float, default=0.05)
    ap.add_argument("--ref-tol", type=float, default=0.03)
    ap.add_argument("--max-iter", type=int, default=1000)
    ap.add_argument("--shared-max-iter", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-pyhessian", action="store_true")
    ap.add_argument("--out", default=str(Path(__file__).with_name("bench_hessian.json")))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model = resnet20()
    x, y, source = cifar_batch(a.batch, 0)
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]

    def ce(mod, b):
        return F.cross_entropy(mod(b[0]), b[1])

    res: dict = {"machine": platform.processor() or platform.machine(), "threads": a.threads,
                 "batch": a.batch, "data": source, "tol": a.tol, "ref_tol": a.ref_tol,
                 "layers": len(names), "model": "resnet20 (random init)"}
    timings = {}
    with hessian_mode(model, "eval"):
        def op():
            return HessianOperator(layer_groups(model, names), batch_losses(model, [(x, y)], ce))

        ref, timings["reference"] = timed(
            lambda: per_layer_traces(op(), a.ref_tol, a.max_iter * 4, 10, seed=100))
        shared, timings["shared"] = timed(
            lambda: hutchinson_traces(op(), a.tol, a.shared_max_iter, 10, seed=1))
        loop, timings["loop"] = timed(lambda: per_layer_traces(op(), a.tol, a.max_iter, 10, seed=2))
    iters = {n: loop[n].iterations for n in names}
    if not a.no_pyhessian:
        (ph, ph_err), t = timed(pyhessian_loop, model, x, y, names, iters)
        timings["pyhessian"] = t if ph is not None else None
    else:
        ph, ph_err = None, "skipped"
    reft = {n: ref[n].traces[n] for n in names}
    sam = shared.samples
    rows = []
    for i, n in enumerate(names):
        r = {"layer": n, "numel": model.get_submodule(n).weight.numel(), "reference": reft[n],
             "ref_rel_se": ref[n].rel_stderr()[n], "shared": shared.traces[n],
             "loop": loop[n].traces[n], "loop_iters": iters[n],
             "loop_sample_rel_std": float(loop[n].samples.std() / abs(reft[n])),
             "shared_sample_rel_std": float(sam[:, i].std() / abs(reft[n])),
             "pyhessian": None if ph is None else ph[n]}
        r["shared_iters_needed"] = int((r["shared_sample_rel_std"] / a.tol) ** 2) + 1
        rows.append(r)
        print(f"{n:18s} ref {reft[n]:9.3f} | shared {shared.traces[n]:9.3f} | loop "
              f"{loop[n].traces[n]:9.3f} ({iters[n]:4d} it) | pyhessian "
              f"{'-' if ph is None else format(ph[n], '9.3f')} | per-sample rel std loop "
              f"{r['loop_sample_rel_std']:.2f} shared {r['shared_sample_rel_std']:.2f}")

    def within(key):
        return sum(abs(r[key] - r["reference"]) <= 0.1 * abs(r["reference"]) for r in rows)

    per_product = timings["shared"] / shared.iterations
    need = max(r["shared_iters_needed"] for r in rows)
    res.update(
        rows=rows, timings_s=timings, shared_iterations=shared.iterations,
        shared_converged=shared.converged, shared_seconds_per_product=per_product,
        shared_iterations_needed_for_tol=need,
        shared_projected_seconds_for_tol=need * per_product,
        loop_total_iterations=sum(iters.values()),
        within_10pct={"shared": within("shared"), "loop": within("loop"),
                      "pyhessian": None if ph is None else within("pyhessian")},
        pyhessian_error=ph_err,
    )
    res["ratio_loop_over_shared"] = timings["loop"] / timings["shared"]
    res["ratio_loop_over_shared_projected"] = timings["loop"] / res[
        "shared_projected_seconds_for_tol"]
    if timings.get("pyhessian"):
        res["ratio_pyhessian_over_loop"] = timings["pyhessian"] / timings["loop"]
    print(json.dumps({k: v for k, v in res.items() if k != "rows"}, indent=1))
    write_json(a.out, res, indent=1)


if __name__ == "__main__":
    main()
