"""Word-level language-modelling data: WikiText-2/103 and Penn Treebank (Mikolov's version).

Local files in the standard layouts (``wiki.{train,valid,test}.tokens``,
``ptb.{train,valid,test}.txt``, optionally ``.gz``), or the Hugging Face ``wikitext``
dataset by name (needs network). Each line gets an ``<eos>`` token (as fairseq and the AWD
LM code do); the vocabulary is built from the training split, unknown words map to
``<unk>``. The token stream is cut into contiguous, non-overlapping blocks of ``seq_len``
inputs with next-token targets.
"""

from __future__ import annotations

import gzip
import os
from collections import Counter

import torch
from torch.utils.data import Dataset

from qtrain.data.base import QDataModule
from qtrain.errors import ConfigError, MissingFileError
from qtrain.offline import require_network
from qtrain.optional import require

LAYOUTS = {
    "wikitext2": ("wiki.train.tokens", "wiki.valid.tokens", "wiki.test.tokens"),
    "wikitext103": ("wiki.train.tokens", "wiki.valid.tokens", "wiki.test.tokens"),
    "ptb": ("ptb.train.txt", "ptb.valid.txt", "ptb.test.txt"),
}
HF_CONFIGS = {"wikitext2": "wikitext-2-v1", "wikitext103": "wikitext-103-v1"}


def read_lines(path: str) -> list[str]:
    if not os.path.exists(path) and os.path.exists(path + ".gz"):
        path += ".gz"
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        return f.read().splitlines()


def tokenize(lines: list[str]) -> list[str]:
    """Whitespace tokens with ``<eos>`` after every line, blank lines included (the
    convention of Mikolov's PTB setup and PyTorch's word_language_model / AWD-LSTM, which
    gives the published counts: WikiText-2 valid 217,646 tokens)."""
    out: list[str] = []
    for line in lines:
        out.extend(line.split())
        out.append("<eos>")
    return out


class Vocabulary:
    def __init__(self, tokens: list[str], min_count: int = 1) -> None:
        counts = Counter(tokens)
        words = sorted((w for w, c in counts.items() if c >= min_count and w not in ("<unk>", "<eos>")),
                       key=lambda w: (-counts[w], w))
        self.itos = ["<unk>", "<eos>"] + words
        self.stoi = {w: i for i, w in enumerate(self.itos)}

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, tokens: list[str]) -> torch.Tensor:
        unk = self.stoi["<unk>"]
        return torch.tensor([self.stoi.get(t, unk) for t in tokens], dtype=torch.long)


class BlockDataset(Dataset):
    def __init__(self, ids: torch.Tensor, seq_len: int) -> None:
        n = (len(ids) - 1) // seq_len
        if n < 1:
            raise ConfigError(f"data.seq_len={seq_len} is longer than the split ({len(ids)} tokens)")
        self.x = ids[: n * seq_len].view(n, seq_len)
        self.y = ids[1 : n * seq_len + 1].view(n, seq_len)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


class LMDataModule(QDataModule):
    """``name`` picks the file layout; ``train_file``/``valid_file``/``test_file`` override
    single files (relative to ``root`` or absolute), e.g. train on PTB and evaluate on
    WikiText-2 valid/test."""

    def __init__(
        self, name: str = "wikitext2", root: str | None = None, seq_len: int = 128,
        train_file: str | None = None, valid_file: str | None = None, test_file: str | None = None,
        hf_name: str | None = None, max_train_tokens: int | None = None, **kw,
    ) -> None:
        super().__init__(root=root, **kw)
        if name not in LAYOUTS:
            raise ConfigError(f"data.name={name!r}; allowed: {sorted(LAYOUTS)}")
        self.name, self.seq_len, self.hf_name = name, seq_len, hf_name
        default = LAYOUTS[name]
        self.files = [f or d for f, d in zip((train_file, valid_file, test_file), default)]
        self.max_train_tokens = max_train_tokens
        self.vocab: Vocabulary | None = None

    def write_fake(self, root: str) -> None:
        g = torch.Generator().manual_seed(self.seed)
        words = [f"w{i}" for i in range(50)] + ["the", "of", "and", "<unk>"]
        for fname, n_lines in zip(LAYOUTS[self.name], (200, 40, 40)):
            lines = []
            for i in range(n_lines):
                if self.name.startswith("wiki") and i % 20 == 0:
                    lines.append(f" = Title {i} = ")
                    continue
                k = int(torch.randint(5, 20, (1,), generator=g))
                idx = torch.randint(0, len(words), (k,), generator=g).tolist()
                lines.append(" " + " ".join(words[j] for j in idx) + " ")
            with open(os.path.join(root, fname), "w") as f:
                f.write("\n".join(lines) + "\n")

    def _split_lines(self) -> list[list[str]]:
        if self.hf_name:
            require_network(f"data.hf_name={self.hf_name!r}", "data.root")
            require("datasets", f"data.hf_name={self.hf_name!r}")
            from datasets import load_dataset

            ds = load_dataset(self.hf_name, HF_CONFIGS.get(self.name))
            return [ds[s]["text"] for s in ("train", "validation", "test")]
        paths = [f if os.path.isabs(f) else os.path.join(self.root or "", f) for f in self.files]
        for key, p in zip(("data.train_file", "data.valid_file", "data.test_file"), paths):
            if not (os.path.exists(p) or os.path.exists(p + ".gz")):
                raise MissingFileError(
                    f"{key}: {p!r} not found (set data.root to the {self.name} folder, or {key})"
                )
        return [read_lines(p) for p in paths]

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        train, valid, test = (tokenize(lines) for lines in self._split_lines())
        if self.max_train_tokens:
            train = train[: self.max_train_tokens]
        self.vocab = Vocabulary(train)
        self.train_set = BlockDataset(self.vocab.encode(train), self.seq_len)
        self.val_set = BlockDataset(self.vocab.encode(valid), self.seq_len)
        self.test_set = BlockDataset(self.vocab.encode(test), self.seq_len)

    @property
    def vocab_size(self) -> int:
        if self.vocab is None:
            self.prepare_data()
            self.setup()
        return len(self.vocab)
