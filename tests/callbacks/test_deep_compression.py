"""DeepCompressionCallback in real Lightning Trainer runs (CPU, tiny MLP, seconds)."""

import json

import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from qtrain.callbacks import deep_compression as DC
from qtrain.quant import pruning as P
from qtrain.quant.huffman import read_dc_file
from qtrain.quant.size import model_huffman_bits, model_storage_bits
from tests.callbacks.tiny_lightning import _TinyClassifier

SPARSITY = {"Linear": 0.75}
BITS = {"Linear": 3}
LAYERS = ("fc1", "fc2")


class TinyMLP(_TinyClassifier):
    def __init__(self, optim="sgd", lr=0.05, momentum=0.9, wd=1e-2, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.fc1, self.fc2 = nn.Linear(12, 24), nn.Linear(24, 4)
        self.optim, self.lr, self.momentum, self.wd = optim, lr, momentum, wd

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))

    def configure_optimizers(self):
        if self.optim == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.lr, weight_decay=self.wd)
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum,
                               weight_decay=self.wd)


def _loader(n=64, batch=8):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 12, generator=g)
    y = (x[:, :4].argmax(1) + (x[:, 4] > 1).long()) % 4
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch)


def _trainer(tmp_path, epochs, callbacks, ckpt=False):
    return pl.Trainer(max_epochs=epochs, accelerator="cpu", logger=False,
                      enable_checkpointing=ckpt, enable_progress_bar=False,
                      enable_model_summary=False, callbacks=callbacks,
                      default_root_dir=str(tmp_path), num_sanity_val_steps=0)


class Probe(pl.Callback):
    """Runs ``fn(module)`` after every optimizer step (batch end) and before every step."""

    def __init__(self, after=None, before=None):
        self.after, self.before, self.steps = after, before, 0

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if self.before:
            self.before(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, *args):
        self.steps += 1
        if self.after:
            self.after(trainer, pl_module)


def test_masks_enforced_in_real_training(tmp_path):
    cb = DC.DeepCompressionCallback(sparsity=SPARSITY, layer_sparsity={"fc2": 0.5}, bits=BITS,
                                    prune_epochs=[0, 1], quantize_epoch=None,
                                    finalize_at_end=False)
    seen = {"grad": 0, "weight": 0}

    def grads(trainer, m):  # runs after the callback's own gradient masking
        if cb.masks:
            for n in LAYERS:
                assert (getattr(m, n).weight.grad[~cb.masks[n]] == 0).all()
            seen["grad"] += 1

    def weights(trainer, m):
        e = trainer.current_epoch
        for n, s in (("fc1", 0.75), ("fc2", 0.5)):
            w, mask = getattr(m, n).weight, cb.masks[n]
            assert (w[~mask] == 0).all()  # exactly 0 after every step (momentum + decay)
            step_s = s * (1 if e >= 1 else 0.5)
            assert int(mask.sum()) == w.numel() - P.n_pruned(w.numel(), step_s)
        seen["weight"] += 1

    model = TinyMLP()
    w0 = model.fc1.weight.detach().clone()
    _trainer(tmp_path, 3, [cb, Probe(weights, grads)]).fit(model, _loader())
    assert seen == {"grad": 24, "weight": 24}
    assert not torch.equal(model.fc1.weight[cb.masks["fc1"]], w0[cb.masks["fc1"]])  # trained


def test_centroid_finetuning_sums_gradients_keeps_codes(tmp_path):
    lr = 0.05
    cb = DC.DeepCompressionCallback(sparsity=SPARSITY, bits=BITS, prune_epochs=[0],
                                    quantize_epoch=1, report_file="dc.json")
    state = {}

    def raw_grad(trainer, m):  # before the callback: the per-weight gradients
        if cb.quantized:
            state["grad"] = {n: getattr(m, n).weight.grad.detach().clone() for n in LAYERS}
            state["c"] = {n: cb.centroids[n].clone() for n in LAYERS}
            state.setdefault("codes", {n: cb.codes[n].clone() for n in LAYERS})

    def check(trainer, m):
        if not cb.quantized:
            return
        for n in LAYERS:
            w, mask, codes = getattr(m, n).weight, cb.masks[n], cb.codes[n]
            assert torch.equal(codes, state["codes"][n])  # codes fixed
            assert (w[~mask] == 0).all()
            assert torch.equal(w[mask], cb.centroids[n][codes[mask]])  # weights shared
            g, c0 = state["grad"][n], state["c"][n]
            ref = torch.stack([g[mask & (codes == k)].sum() for k in range(c0.numel())])
            torch.testing.assert_close(cb.centroids[n], c0 - lr * ref, atol=1e-6, rtol=1e-5)
        state["n"] = state.get("n", 0) + 1

    model = TinyMLP(lr=lr, momentum=0.0, wd=0.0)
    _trainer(tmp_path, 3, [Probe(before=raw_grad), cb, Probe(after=check)]).fit(model, _loader())
    # 3 bits: K = 2^3 - 1 = 7 centroids, code 7 reserved for filler zeros
    assert state["n"] == 16 and all(cb.centroids[n].numel() == 7 for n in LAYERS)
    assert all(int(cb.codes[n][cb.masks[n]].max()) <= 6 for n in LAYERS)
    # end of fit: fake-quant layers with the shared-weight quantizer; sizes agree with size.py
    assert isinstance(model.fc1.weight_quantizer, DC.SharedWeightQuantizer)
    x = torch.randn(5, 12)
    out_q = model(x)
    model.fc1.weight_quantizer.enabled = model.fc2.weight_quantizer.enabled = False
    torch.testing.assert_close(model(x), out_q)
    model.fc1.weight_quantizer.enabled = model.fc2.weight_quantizer.enabled = True
    r = json.loads((tmp_path / "dc.json").read_text())
    layers = [P.sparse_layer_size(cb.masks[n], cb.codes[n], 7, 5, getattr(model, n).bias.numel())
              for n in LAYERS]
    assert model_storage_bits(model).total_bits == sum(x.shared_bits for x in layers)
    assert r["shared_bits"] == sum(x.shared_bits for x in layers)
    assert r["dense_bits"] == 32 * sum(p.numel() for p in model.parameters())
    # the run summary's Huffman column codes both streams (codes and relative indices), as
    # the callback's report and the paper do -- not only the codes (the index stream at 5 bits)
    both = sum(x.huffman_weight_bits + x.huffman_index_bits + 32 * 7 + 32 * x.bias_numel
               for x in layers)
    assert model_huffman_bits(model).total_bits == both
    assert both < sum(x.shared_bits - 3 * (x.nnz + x.fillers) + x.huffman_weight_bits
                      for x in layers)  # the indices compress too
    assert r["huffman_bits"] == sum(x.huffman_bits for x in layers)
    assert r["huffman_compression"] == pytest.approx(r["dense_bits"] / r["huffman_bits"])
    # the Huffman column on disk: decodes to the shared weights, holds exactly its bits
    dch = tmp_path / "deep_compression.dch"
    back = read_dc_file(dch)
    for n, x in zip(LAYERS, layers):
        layer = getattr(model, n)
        assert torch.equal(back[n]["weight"], layer.weight_quantizer(layer.weight.detach()))
        assert torch.equal(back[n]["bias"], layer.bias.detach())
        assert x.huffman_bits == x.huffman_weight_bits + x.huffman_index_bits + 32 * 7 \
            + 32 * layer.bias.numel()
    payload = sum((x.huffman_weight_bits + 7) // 8 + (x.huffman_index_bits + 7) // 8
                  + 4 * (7 + x.bias_numel) + 8 + 32 for x in layers)  # + code tables
    size = dch.stat().st_size
    assert r["huffman_file_bytes"] == size and 0 < size - payload < 512  # + JSON header


def _run_state(cb, model):
    return ({n: getattr(model, n).weight.detach().clone() for n in LAYERS},
            {k: dict(getattr(cb, k)) for k in ("masks", "codes", "centroids")})


def test_resume_mid_quantized_stage_reproduces_state(tmp_path, monkeypatch):
    def make():
        return DC.DeepCompressionCallback(sparsity=SPARSITY, bits=BITS, prune_epochs=[0, 1],
                                          quantize_epoch=2, finalize_at_end=False)

    ref_cb, ref = make(), TinyMLP(optim="adam", lr=0.01)
    _trainer(tmp_path / "a", 4, [ref_cb]).fit(ref, _loader())
    cb1, m1 = make(), TinyMLP(optim="adam", lr=0.01)
    ck = pl.callbacks.ModelCheckpoint(dirpath=str(tmp_path / "ck"), save_last=True)
    _trainer(tmp_path / "b", 3, [cb1, ck], ckpt=True).fit(m1, _loader())
    saved = next(v for k, v in torch.load(tmp_path / "ck/last.ckpt", weights_only=True)["callbacks"].items()
                 if k.startswith("DeepCompressionCallback"))
    for n in LAYERS:  # codes (K = 7 here) stored as uint8, not int64 (2x the float layer)
        assert saved["codes"][n].dtype == torch.uint8 and torch.equal(saved["codes"][n].long(), cb1.codes[n])
    # the resumed run must take everything from the checkpoint: no re-pruning or k-means
    monkeypatch.setattr(DC.KM, "scalar_kmeans", lambda *a, **k: pytest.fail("re-clustered"))
    monkeypatch.setattr(DC.P, "magnitude_mask", lambda *a, **k: pytest.fail("re-pruned"))
    cb2, m2 = make(), TinyMLP(optim="adam", lr=0.01, seed=5)
    _trainer(tmp_path / "c", 4, [cb2]).fit(m2, _loader(), ckpt_path=str(tmp_path / "ck/last.ckpt"))
    assert cb2.quantized and cb2.n_prune_steps == 2
    (w_ref, s_ref), (w2, s2) = _run_state(ref_cb, ref), _run_state(cb2, m2)
    for n in LAYERS:
        assert torch.equal(w2[n], w_ref[n])
        for k in s_ref:
            assert torch.equal(s2[k][n], s_ref[k][n]), (k, n)
    assert not torch.equal(cb1.centroids["fc1"], cb2.centroids["fc1"])  # epoch 3 trained them


def test_bad_config_errors():
    with pytest.raises(ValueError, match="sparsity.*Dense"):
        DC.DeepCompressionCallback(sparsity={"Dense": 0.5})
    with pytest.raises(ValueError, match="quantize_epoch"):
        DC.DeepCompressionCallback(prune_epochs=[0, 3], quantize_epoch=2)
    cb = DC.DeepCompressionCallback(layer_bits={"fc9": 4})
    with pytest.raises(ValueError, match="layer_bits.*fc9"):
        cb.setup(None, TinyMLP())


class _TwoLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.head = nn.Linear(6, 2), nn.Linear(2, 2)


def test_size_report_both_conventions_worked_by_hand():
    """Layer fc as tests/quant/test_pruning.py's hand-worked 2x6 example (non-zeros at flat
    0, 5, 6, 11; 2-bit indices; K = 3): 448 / 268 / 184 / 178 bits dense / pruned / shared /
    Huffman, 64 of them its 2 fp32 biases. `head` (4 weights + 2 biases) is not selected.
    Ours: whole model, biases and `head` at fp32 in every column; the paper's (Tables 1-3):
    fc's weights only, biases not counted."""
    m = _TwoLinear()
    cb = DC.DeepCompressionCallback(sparsity={"Linear": 0.5}, bits={"Linear": 2},
                                    index_bits={"Linear": 2}, include=["fc"])
    cb.setup(None, m)
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask.view(-1)[[0, 5, 6, 11]] = True
    codes = torch.zeros(2, 6, dtype=torch.long)
    codes.view(-1)[[5, 6, 11]] = torch.tensor([1, 2, 1])
    cb.masks, cb.codes, cb.centroids = {"fc": mask}, {"fc": codes}, {"fc": torch.zeros(3)}
    r = cb.size_report(m)
    head = 32 * 6
    assert (r["dense_bits"], r["pruned_bits"], r["shared_bits"], r["huffman_bits"]) == \
        (448 + head, 268 + head, 184 + head, 178 + head)
    assert (r["paper_dense_bits"], r["paper_pruned_bits"], r["paper_shared_bits"],
            r["paper_huffman_bits"]) == (384, 204, 120, 114)
    assert r["paper_huffman_compression"] == pytest.approx(384 / 114)
    assert r["huffman_compression"] == pytest.approx(640 / 370)
    assert "paper's convention" in DC.format_report(r) and "(3.4x)" in DC.format_report(r)


def test_default_kmeans_keeps_centroids_stranded_in_the_pruning_gap():
    """Default split_empty=False: linear-init centroids inside the pruned gap around 0 stay
    unused (plain Lloyd, eq. (2)); the stored code stream uses fewer than K codes."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(40, 10))
    cb = DC.DeepCompressionCallback(sparsity={"Linear": 0.5}, bits={"Linear": 4})
    assert cb.split_empty is False
    cb.setup(None, m)
    cb.prune_step(0)
    cb.quantize()
    (name,) = cb.codes
    mask, codes, c = cb.masks[name], cb.codes[name], cb.centroids[name]
    t = float(m[0].weight.detach().abs()[mask].min())  # survivors: |w| >= t
    used = torch.unique(codes[mask])
    unused = [k for k in range(c.numel()) if k not in used.tolist()]
    assert c.numel() == 15 and unused
    assert all(abs(float(c[k])) < t for k in unused)  # stranded in (-t, t)
    split = DC.DeepCompressionCallback(sparsity={"Linear": 0.5}, bits={"Linear": 4},
                                       split_empty=True)
    torch.manual_seed(0)
    m2 = nn.Sequential(nn.Linear(40, 10))
    split.setup(None, m2)
    split.prune_step(0)
    split.quantize()
    assert len(torch.unique(split.codes[name][split.masks[name]])) == 15
