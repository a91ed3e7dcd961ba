"""Gradient communication for data-parallel training: DDP communication hooks
(``torch.nn.parallel.DistributedDataParallel.register_comm_hook``) and the Lightning strategy
that registers them on every device, CPU / gloo included (:mod:`qtrain.comm.strategy`)."""
