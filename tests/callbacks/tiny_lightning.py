"""Tiny LightningModules and data for the callback tests (CPU, seconds)."""

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class _TinyClassifier(pl.LightningModule):
    """Shared cross-entropy training/validation steps of the tiny test models."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("val_loss", F.cross_entropy(logits, y))
        self.log("val_acc", (logits.argmax(1) == y).float().mean())


class TinyCNN(_TinyClassifier):
    def __init__(self, optim: str = "sgd", lr: float = 0.05):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8 * 4 * 4, 4)
        self.optim, self.lr = optim, lr

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.conv2(x))
        return self.fc(x.flatten(1))

    def configure_optimizers(self):
        if self.optim == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.lr, weight_decay=1e-2)
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, weight_decay=1e-2)


class TinyTransformerish(_TinyClassifier):
    """Embedding -> attention-like projections -> FFN -> head (names like fairseq)."""

    def __init__(self, vocab: int = 64, dim: int = 16, lr: float = 0.05):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, dim)
        self.q_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)
        self.head = nn.Linear(dim, 4)
        self.lr = lr

    def forward(self, idx):
        h = self.embed_tokens(idx)
        h = h + self.out_proj(torch.tanh(self.q_proj(h)))
        h = h + self.fc2(F.relu(self.fc1(h)))
        return self.head(h.mean(1))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, weight_decay=1e-3)


def image_loader(n: int = 32, batch: int = 8, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 4, 4, generator=g)
    y = torch.randint(0, 4, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=False)


def token_loader(n: int = 32, batch: int = 8, seq: int = 6, vocab: int = 64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, vocab, (n, seq), generator=g)
    y = x[:, 0] % 4
    return DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=False)


def trainer(**kw) -> pl.Trainer:
    base = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                deterministic=True)
    base.update(kw)
    return pl.Trainer(**base)


class OptimizerIdentities(pl.Callback):
    """The trainer's optimizer after every training batch, to count rebuilds.

    Holds the optimizer objects themselves, not their ``id()``: a freed optimizer's id can be
    reused by its replacement, which made distinct-count checks flaky (a CI failure)."""

    def __init__(self):
        self.optimizers = []

    @property
    def ids(self) -> list[int]:
        return [id(o) for o in self.optimizers]

    def on_train_batch_end(self, trainer, *args):
        self.optimizers.append(trainer.optimizers[0])
