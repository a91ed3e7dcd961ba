"""2 CPU processes (gloo): the Quant-Noise output-quantizer range is the min / max over all
ranks' outputs (identical on both ranks, = PyTorch's MinMaxObserver on the concatenation),
and the weight masks of a step are identical on both ranks."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.ao.quantization.observer import MinMaxObserver

from qtrain.nn.quant_noise import OutputQuantNoise, QuantNoiseQuantizer


def _rank_output(rank):
    return torch.linspace(-1.0, 2.0, 50) * (rank + 1) + rank  # rank 1 has a wider range


def _worker(rank, init, out_dir):
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        aq = OutputQuantNoise(bits=8).train()
        aq.new_step()
        aq(_rank_output(rank))
        wq = QuantNoiseQuantizer(p=0.5, mode="int8", seed=4).train()
        wq.new_step()
        w = torch.randn(16, 16, generator=torch.Generator().manual_seed(rank))
        mask = wq(w) != w  # different local weights, same mask draw
        torch.save({"scale": aq.scale.clone(), "zp": aq.zero_point.clone(),
                    "mask": wq._draw(w, 0.5)}, f"{out_dir}/rank{rank}.pt")
        assert mask.any()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # spawns 2 processes: ~50 s on the shared 2-core box (imports dominate)
def test_two_ranks_share_output_range_and_masks(tmp_path):
    init = f"file://{tmp_path}/store"
    mp.spawn(_worker, args=(init, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    obs = MinMaxObserver(quant_min=0, quant_max=255)
    obs(torch.cat([_rank_output(0), _rank_output(1)]))
    s, z = obs.calculate_qparams()
    for r in (r0, r1):
        assert float(r["scale"]) == float(s) and int(r["zp"]) == int(z)
    assert torch.equal(r0["mask"], r1["mask"])
