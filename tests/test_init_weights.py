"""init_from: a run starts from a finished float run's weights (qtrain.init_weights)."""

from __future__ import annotations

import pytest
import torch

from qtrain import checkpointing, init_weights
from qtrain.errors import ConfigError, DataFileError
from qtrain.models.small import MLP, SmallCNN
from tests.hydra_helpers import run


def _write(model, path, prefix="model."):
    state = {prefix + k: v for k, v in model.state_dict().items()}
    checkpointing.write_checkpoint({"state_dict": state, "global_step": 7, "epoch": 1}, path)


def test_loads_every_tensor_and_reports_provenance(tmp_path):
    torch.manual_seed(0)
    src, dst = SmallCNN(), SmallCNN()
    (tmp_path / "checkpoints").mkdir()
    _write(src, tmp_path / "checkpoints" / "last.ckpt")
    assert any(not torch.equal(a, b) for a, b in zip(src.state_dict().values(),
                                                     dst.state_dict().values()))
    info = init_weights.initialise(dst, str(tmp_path))  # a run dir resolves to its last.ckpt
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k
    assert info["global_step"] == 7 and len(info["sha256"]) == 64
    assert info["file"].endswith("checkpoints/last.ckpt")


def test_another_architecture_is_one_config_error_naming_keys(tmp_path):
    _write(MLP(), tmp_path / "mlp.ckpt")
    with pytest.raises(ConfigError, match=r"init_from=.*mlp\.ckpt.*(missing|not in this model)"):
        init_weights.initialise(SmallCNN(), str(tmp_path / "mlp.ckpt"))


def test_shape_mismatch_is_named(tmp_path):
    _write(MLP(hidden=32), tmp_path / "a.ckpt")
    with pytest.raises(ConfigError, match=r"shape \(checkpoint vs model\)"):
        init_weights.initialise(MLP(hidden=64), str(tmp_path / "a.ckpt"))


def test_bad_paths_and_files(tmp_path):
    assert init_weights.initialise(SmallCNN(), None) is None
    with pytest.raises(ConfigError, match="init_from=.*no such file"):
        init_weights.initialise(SmallCNN(), str(tmp_path / "nope.ckpt"))
    with pytest.raises(ConfigError, match="a folder without"):
        init_weights.initialise(SmallCNN(), str(tmp_path))
    (tmp_path / "foreign.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(DataFileError, match="foreign.ckpt"):
        init_weights.initialise(SmallCNN(), str(tmp_path / "foreign.ckpt"))
    _write(SmallCNN(), tmp_path / "other.ckpt", prefix="net.")
    with pytest.raises(ConfigError, match="no 'model.\\*' tensors"):
        init_weights.initialise(SmallCNN(), str(tmp_path / "other.ckpt"))


def test_quantized_run_starts_from_the_float_run(tmp_path):
    """A real float run, then a QAT recipe with init_from=<its run dir> and no training:
    its float master weights ARE the float run's (the same test accuracy to the last digit
    and the same test loss: a random initialisation gives neither) and the summary names
    the file and its checksum."""
    fp32 = run(["recipe=fp32_resnet20_cifar10", "debug=smoke"], tmp_path / "fp32")
    q = run(["recipe=lsq_w2a2_resnet20_cifar10", "debug=smoke", "fit=false",
             f"init_from={tmp_path / 'fp32'}"], tmp_path / "q")
    assert q["float_weights_metric"] == pytest.approx(fp32["fp32_metric"], abs=0)
    assert q["init_from"]["file"] == str((tmp_path / "fp32" / "checkpoints" / "last.ckpt"))


def test_fine_tune_from_init_reports_the_starting_network_as_fp32(tmp_path):
    """quant_start_epoch=0 with init_from (no FP32 phase): the run's FP32 test number is the
    starting network's own (equal to the float run's to the last digit), not the fine-tuned
    float master weights, and the summary says which weights it tested."""
    fp32 = run(["recipe=fp32_resnet20_cifar10", "debug=smoke"], tmp_path / "fp32")
    q = run(["recipe=lsq_w2a2_resnet20_cifar10", "debug=smoke", "quant_start_epoch=0",
             "trainer.max_epochs=1", "optimizer.lr=0.5", f"init_from={tmp_path / 'fp32'}"],
            tmp_path / "q")
    assert q["fp32_source"] == "init_from weights"
    assert q["fp32_metric"] == pytest.approx(fp32["fp32_metric"], abs=0)
    assert fp32["fp32_source"] == "this run (no quantization)"


def test_run_refuses_another_architectures_weights_before_training(tmp_path):
    """run.py really loads init_from: a digits CNN cannot start from a ResNet-20 file."""
    torch.manual_seed(0)
    from qtrain.models.resnet_cifar import resnet20

    _write(resnet20(), tmp_path / "resnet20.ckpt")
    with pytest.raises(ConfigError, match=r"init_from=.*resnet20\.ckpt.*do not fit this model"):
        run(["recipe=qat_int4_digits", "debug=smoke", f"init_from={tmp_path / 'resnet20.ckpt'}"],
            tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()  # nothing trained
