"""Lightning's ``DDPStrategy`` with the DDP communication hook registered on every device.

``pytorch_lightning.strategies.DDPStrategy(ddp_comm_hook=..., ddp_comm_state=...)`` registers
the hook only when the root device is CUDA (``_register_ddp_hooks``: a PyTorch 1.8 NCCL-only
restriction, lifted since): on CPU / gloo the hook is dropped without a warning and the run
silently all-reduces fp32 gradients. :class:`CommHookDDPStrategy` registers it on any device
(``DistributedDataParallel.register_comm_hook`` works with gloo), so ``trainer=ddp_cpu_8bit``
exercises the same hook as ``trainer=ddp_8bit`` on GPUs.
"""

from __future__ import annotations

from pytorch_lightning.overrides.distributed import _register_ddp_comm_hook
from pytorch_lightning.strategies import DDPStrategy


class CommHookDDPStrategy(DDPStrategy):
    """``DDPStrategy`` whose ``ddp_comm_hook`` / ``ddp_comm_state`` apply on CPU too."""

    @property
    def comm_state(self):
        """The hook's state object (e.g. :class:`qtrain.comm.eight_bit.EightBitState`)."""
        return self._ddp_comm_state

    def _register_ddp_hooks(self) -> None:
        _register_ddp_comm_hook(model=self.model, ddp_comm_state=self._ddp_comm_state,
                                ddp_comm_hook=self._ddp_comm_hook,
                                ddp_comm_wrapper=self._ddp_comm_wrapper)
