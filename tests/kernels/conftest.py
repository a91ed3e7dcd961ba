import os

import torch

# Triton runs on the CPU only through its interpreter. qtrain_kernels also works when triton
# was imported earlier without this (see qtrain_kernels.runtime), but set it when possible.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
