"""ONNX QDQ export (qtrain.export_onnx) measured: file sizes (packed safetensors, QDQ ONNX,
fp32 ONNX of the same network), onnxruntime CPU latency of the QDQ vs the fp32 ONNX side by
side in one process (interleaved repeats, medians), and test accuracy of onnxruntime's QDQ
model vs qtrain's packed model on the real test set.

Workloads:
* ``--run-dir runs/...``: any finished ``train.py ... export=true`` run (its packed file, its
  config's datamodule for the test set), e.g. the default digits recipe;
* ``--resnet20 /work/data/cifar10``: the committed fp32 ResNet-20 CIFAR-10 weights
  (recipes/weights/fp32_resnet20_cifar10) converted with the uniform QAT callback (int8
  per-channel symmetric weights, or 4-bit group-wise affine with ``--bits 4 --group 16``;
  uint8 EMA-range activations, first / last layer quantized), the EMA ranges calibrated on
  ``--calib`` training batches with the weights and BatchNorm frozen -- no fine-tuning, so
  the accuracy is post-training, not a QAT result. ``--act pact`` / ``--act lsq``: the
  activations with PACT (clip level alpha = the 99.9th percentile of the first calibration
  batch, ``alpha_init="calibrate"``) or unsigned LSQ (step 2 mean|x| / sqrt(Qp) from the
  first batch, Esser 2020 sec. 2.1) instead -- their initialisations, not trained values;
  first conv and last fc then stay float (the image input is signed).

    OMP_NUM_THREADS=1 python benchmarks/onnx_export.py --resnet20 /work/data/cifar10
    OMP_NUM_THREADS=1 python benchmarks/onnx_export.py --resnet20 /work/data/cifar10 --act pact
    OMP_NUM_THREADS=1 python benchmarks/onnx_export.py --run-dir runs/qat_int4_digits/<time>
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from qtrain.export import load_run, pack_model, save_packed  # noqa: E402
from qtrain.export_onnx import save_onnx  # noqa: E402


def _session(path: str, threads: int, fold_dq: bool = False):
    """onnxruntime CPU session; ``fold_dq``: ``session.disable_quant_qdq=1`` (Q/DQ treated
    as plain operators, so the weights' DequantizeLinear is constant-folded at load)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = so.inter_op_num_threads = threads
    if fold_dq:
        so.add_session_config_entry("session.disable_quant_qdq", "1")
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def latency(paths: dict[str, str], x: torch.Tensor, repeats: int, threads: int) -> dict:
    """Median ms per run of each file's session on ``x``, the files interleaved per repeat."""
    sess = {k: _session(p, threads) for k, p in paths.items()}
    sess["qdq_dq_folded"] = _session(paths["qdq"], threads, fold_dq=True)
    feed = {"input": x.numpy()}
    for s in sess.values():  # warm-up
        s.run(None, feed)
    times = {k: [] for k in sess}
    for _ in range(repeats):
        for k, s in sess.items():
            t = time.perf_counter()
            s.run(None, feed)
            times[k].append((time.perf_counter() - t) * 1e3)
    return {k: round(statistics.median(v), 3) for k, v in times.items()}


def accuracy(packed, path: str, batches, threads: int) -> dict:
    s = _session(path, threads)
    hits_t = hits_o = agree = n = 0
    max_diff = 0.0
    for x, y in batches:
        with torch.no_grad():
            ref = packed(x)
        got = torch.from_numpy(s.run(None, {"input": x.numpy()})[0])
        max_diff = max(max_diff, float((got - ref).abs().max()))
        hits_t += int((ref.argmax(1) == y).sum())
        hits_o += int((got.argmax(1) == y).sum())
        agree += int((got.argmax(1) == ref.argmax(1)).sum())
        n += len(y)
    return {"n_test": n, "acc_packed_torch": hits_t / n, "acc_onnxruntime_qdq": hits_o / n,
            "argmax_agreement": agree / n, "max_abs_diff": max_diff}


def measure(packed, batches, out_dir: str, args, run: dict) -> dict:
    x1 = batches[0][0][:1]
    p_q, p_f = os.path.join(out_dir, "model.onnx"), os.path.join(out_dir, "fp32.onnx")
    p_s = os.path.join(out_dir, "model_packed.safetensors")
    f = save_onnx(packed, x1, p_f, quantized=False)  # (also warms the imports up)
    t = time.perf_counter()
    q = save_onnx(packed, x1, p_q, run=run)
    t_export = time.perf_counter() - t
    s = save_packed(packed, p_s, run)
    xb = batches[0][0][: args.batch]
    res = {"run": run, "export_s": round(t_export, 2), "n_quantized_layers":
           q["n_quantized_layers"], "bytes": {"packed_safetensors": s["file_bytes"],
           "onnx_qdq": q["file_bytes"], "onnx_fp32": f["file_bytes"]},
           "latency_ms_batch1": latency({"qdq": p_q, "fp32": p_f}, x1, args.repeats,
                                        args.threads),
           f"latency_ms_batch{len(xb)}": latency({"qdq": p_q, "fp32": p_f}, xb,
                                                 max(5, args.repeats // 10), args.threads),
           **accuracy(packed, p_q, batches, args.threads)}
    return res


def _cifar_batches(root: str, split: str, n: int | None, bs: int = 250):
    from qtrain.data.vision import CIFARDataModule

    dm = CIFARDataModule(name="cifar10", root=root, loader="tensor", batch_size=bs,
                         eval_batch_size=bs, verify_checksums=False, augment=False)
    dm.prepare_data()
    dm.setup("fit" if split == "train" else "test")
    loader = dm.train_dataloader() if split == "train" else dm.test_dataloader()
    out = []
    for b in loader:
        x, y = dm.on_after_batch_transfer(b, 0)
        out.append((x.float().contiguous(), y))
        if n is not None and len(out) >= n:
            break
    return out


def resnet20(args) -> tuple:
    from qtrain import init_weights
    from qtrain.callbacks.qat import QATCallback
    from qtrain.models.resnet_cifar import cifar_resnet
    from qtrain.nn.learned_quantizers import LSQQuantizer, PACTQuantizer
    from qtrain.nn.uniform_quantizer import UniformQuantizer

    model = cifar_resnet("resnet20", num_classes=10)
    init_weights.initialise(model, "recipes/weights/fp32_resnet20_cifar10")
    g = {"granularity": "channel", "symmetric": True} if args.group is None else {
        "granularity": "group", "group_size": args.group, "symmetric": False}
    # conv1: 27 inputs (group-wise), and a signed input PACT / unsigned LSQ would clip at 0
    first_last = "quantize" if args.group is None and args.act == "uniform" else "keep"
    act = {"uniform": functools.partial(UniformQuantizer, symmetric=False, granularity="tensor",
                                        observer="ema"),
           "pact": functools.partial(PACTQuantizer, alpha_init="calibrate"),
           "lsq": functools.partial(LSQQuantizer, signed=False, role="activation")}[args.act]
    QATCallback(bits=args.bits, act_bits=8,
                weight=functools.partial(UniformQuantizer, observer="minmax", **g),
                act=act, first_last=first_last).convert(model)
    model.eval()
    for m in model.modules():  # calibrate only the activation ranges (EMA, Jacob 2018)
        if isinstance(m, UniformQuantizer) and m.observer == "ema":
            m.train()
    with torch.no_grad():
        for x, _ in _cifar_batches(args.resnet20, "train", args.calib, bs=128):
            model(x)
    model.eval()
    packed = pack_model(model, backend="torch").eval()
    batches = _cifar_batches(args.resnet20, "test", args.test_batches)
    calib = {"uniform": "EMA calibration", "pact": "PACT alpha = 99.9th percentile of the "
             "first batch", "lsq": "LSQ step initialised on the first batch"}[args.act]
    run = {"workload": f"resnet20 cifar10 fp32 weights + uniform conversion + {calib}",
           "bits": args.bits, "group_size": args.group, "act_bits": 8, "calib_batches":
           args.calib, "act": args.act}
    return packed, batches, run


def from_run(args) -> tuple:
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(os.path.join(args.run_dir, "config_resolved.yaml"))
    packed = load_run(args.run_dir, backend="torch")
    dm = instantiate(cfg.data)
    dm.prepare_data()
    dm.setup("test")
    batches = []
    for b in dm.test_dataloader():
        x, y = dm.on_after_batch_transfer(b, 0)
        batches.append((x.float().contiguous(), y))
    return packed, batches, {"workload": f"run {args.run_dir}", "recipe": cfg.get("recipe_name")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run-dir")
    p.add_argument("--resnet20", metavar="CIFAR10_ROOT")
    p.add_argument("--bits", type=int, default=8)
    p.add_argument("--group", type=int, default=None)
    p.add_argument("--calib", type=int, default=20)
    p.add_argument("--act", choices=("uniform", "pact", "lsq"), default="uniform",
                   help="--resnet20 activation quantizer (uniform EMA, PACT, unsigned LSQ)")
    p.add_argument("--test-batches", type=int, default=None)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=200)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="keep the files here (default: a temp dir)")
    p.add_argument("--json", default=None, help="append the result as one JSON line")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    packed, batches, run = resnet20(a) if a.resnet20 else from_run(a)
    with tempfile.TemporaryDirectory() as tmp:
        out = a.out or tmp
        os.makedirs(out, exist_ok=True)
        res = measure(packed, batches, out, a, run)
    res["machine"] = "2-core CPU dev VM, shared (load: %s)" % (os.getloadavg()[0],)
    print(json.dumps(res, indent=1))
    if a.json:
        with open(a.json, "a") as f:
            f.write(json.dumps(res) + "\n")


if __name__ == "__main__":
    main()
