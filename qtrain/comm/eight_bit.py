"""DDP communication hook: 8-bit gradient exchange of Dettmers (2016, ICLR), "8-Bit
Approximations for Parallelism in Deep Learning" (arXiv:1511.04561), data parallelism.

Every rank compresses its gradient bucket to 8-bit codes (dynamic tree by default, linear
8-bit as an option; :mod:`qtrain.quant.dynamic_tree`) plus one fp32 absolute maximum per
segment, all ranks exchange them (one ``all_gather`` of a uint8 payload: codes, then the
scales' bytes), and every rank decodes all ``W`` contributions, sums them in fp32 in rank
order and divides by ``W`` -- the paper's "send 8-bit gradients, decompress and aggregate in
32-bit" -- so every rank ends with the same averaged gradient (DDP needs that). The ranks'
codes are not summed as integers: 8-bit sums would overflow, and codes of different scales do
not add. Structured like PyTorch's ``fp16_compress_hook`` (compress, async collective,
``Future.then`` to decompress into ``bucket.buffer()``).

Normalisation (``normalize``): ``"tensor"`` (default) one absmax per gradient tensor of the
bucket -- the paper normalises each matrix by its maximum absolute value (~, its GPU code not
re-verified); ``"bucket"`` one absmax per DDP bucket; ``"chunk"`` one per ``chunk_size``
consecutive elements (bitsandbytes-style blocks; later work, not the paper). No error feedback
(the paper has none; 1-bit SGD's residual is a different method).

Bytes (instrumented on the state, per rank): ``bytes_sent`` = the payload this rank hands to
the collective, N codes + 4 bytes per segment; ``bytes_fp32`` = what the default hook hands to
its all-reduce for the same buckets (N elements x 4 bytes); ``bytes_received`` = the other
ranks' payloads this rank receives. With W ranks a ring all-reduce moves 2 (W-1)/W x 4N bytes
per rank and the all-gather (W-1) x (N + 4S): at W = 2 both counts give the ratio
``bytes_sent / bytes_fp32`` (~1/4); the all-gather's advantage shrinks with W and is gone
near W = 8 (the paper's systems had few GPUs per node). Compression and decoding cost CPU /
GPU time that a fast network may not win back; this module measures bytes, not speed.
"""

import torch
import torch.distributed as dist

from qtrain.errors import ConfigError
from qtrain.quant.dynamic_tree import (
    FORMATS,
    CodeTable,
    chunk_lengths,
    dequantize,
    make_table,
    quantize,
)

NORMALIZE = ("tensor", "bucket", "chunk")


class EightBitState:
    """Settings and byte counters of :func:`eight_bit_hook` (one per process)."""

    def __init__(self, format: str = "dynamic_tree", normalize: str = "tensor",
                 chunk_size: int = 2048, process_group=None) -> None:
        if format not in FORMATS:
            raise ConfigError(f"comm hook format={format!r}: allowed {', '.join(FORMATS)}")
        if normalize not in NORMALIZE:
            raise ConfigError(f"comm hook normalize={normalize!r}: allowed "
                              f"{', '.join(NORMALIZE)}")
        if normalize == "chunk" and (not isinstance(chunk_size, int) or chunk_size < 1):
            raise ConfigError(f"comm hook chunk_size={chunk_size!r}: a positive integer")
        self.format, self.normalize, self.chunk_size = format, normalize, chunk_size
        self.process_group = process_group
        self.table: CodeTable = make_table(format)
        self._tables: dict = {}  # device -> the table there (moved once, not per bucket)
        self.reset()

    def table_on(self, device) -> CodeTable:
        key = str(device)
        if key not in self._tables:
            self._tables[key] = self.table.to(device)
        return self._tables[key]

    def reset(self) -> None:
        self.bytes_sent = self.bytes_fp32 = self.bytes_received = self.buckets = 0

    def stats(self) -> dict:
        ratio = self.bytes_sent / self.bytes_fp32 if self.bytes_fp32 else None
        return {"format": self.format, "normalize": self.normalize, "buckets": self.buckets,
                "bytes_sent": self.bytes_sent, "bytes_received": self.bytes_received,
                "bytes_fp32": self.bytes_fp32, "ratio_sent_to_fp32": ratio}

    def lengths(self, bucket) -> torch.Tensor:
        """Segment lengths of the bucket's flat buffer for the chosen normalisation."""
        n = bucket.buffer().numel()
        if self.normalize == "bucket":
            return torch.tensor([n], dtype=torch.long)
        if self.normalize == "chunk":
            return chunk_lengths(n, self.chunk_size)
        sizes = [p.numel() for p in bucket.parameters()]
        if sum(sizes) != n:  # the buffer is the parameters' gradients back to back
            raise RuntimeError(f"DDP bucket {bucket.index()}: parameters hold {sum(sizes)} "
                               f"elements, the buffer {n}; use normalize=bucket or chunk")
        return torch.tensor(sizes, dtype=torch.long)


def _all_gather(out: torch.Tensor, inp: torch.Tensor, group):
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return gather(out, inp, group=group, async_op=True).get_future()


def eight_bit_hook(state: "EightBitState", bucket) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: 8-bit all-gather, fp32 decode and average (module docstring).
    (No postponed annotations in this module: DDP checks the return annotation's object.)
    Register with ``ddp_model.register_comm_hook(EightBitState(...), eight_bit_hook)``."""
    group = state.process_group if state.process_group is not None else dist.group.WORLD
    world = dist.get_world_size(group)
    buffer = bucket.buffer()
    lengths = state.lengths(bucket).to(buffer.device)
    table = state.table_on(buffer.device)
    codes, scales = quantize(buffer.detach(), table, lengths)
    n = codes.numel()
    payload = torch.cat([codes, scales.view(torch.uint8)])
    gathered = torch.empty(world * payload.numel(), dtype=torch.uint8, device=buffer.device)
    state.buckets += 1
    state.bytes_sent += payload.numel()
    state.bytes_received += (world - 1) * payload.numel()
    state.bytes_fp32 += n * 4

    def decode(fut) -> torch.Tensor:
        fut.wait()
        rows = gathered.view(world, -1)
        total = torch.zeros(n, dtype=torch.float32, device=buffer.device)
        for r in range(world):  # same order on every rank: identical sums
            rank_scales = rows[r, n:].clone().view(torch.float32)
            total += dequantize(rows[r, :n], rank_scales, table, lengths)
        buffer.copy_(total.div_(world).view_as(buffer))
        return buffer

    return _all_gather(gathered, payload, group).then(decode)
