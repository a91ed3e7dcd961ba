import os

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("QTRAIN_OFFLINE", "1")  # never try the network from tests
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

# Test tensors are small: one intra-op thread avoids thread overhead (and oversubscription
# when the test runner shares the cores) and keeps CPU results bitwise repeatable.
torch.set_num_threads(1)
