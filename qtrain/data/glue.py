"""GLUE sentence(-pair) classification: Hugging Face ``glue/<task>`` or local GLUE TSV files.

Local layout: ``<root>/train.tsv`` and ``<root>/dev.tsv`` (MNLI: ``dev_matched.tsv``) in the
official GLUE column formats (SST-2: header ``sentence<TAB>label``; CoLA: no header,
``source, label, mark, sentence``; MRPC: header ``Quality #1 ID #2 ID #1 String #2 String``,
possibly with a UTF-8 BOM; QNLI/RTE: header ``index, sentence1/question, ..., label``;
MNLI: header, sentence1/sentence2 in columns 8/9, gold label last). GLUE test labels are
not public, so the test split is the dev split. Tokenizer: ``AutoTokenizer`` from a name or
a local folder.
"""

from __future__ import annotations

import os

import torch
from torch.utils.data import Dataset

from qtrain.data.base import QDataModule
from qtrain.errors import ConfigError
from qtrain.offline import require_network
from qtrain.optional import require

# task -> (text columns in HF, number of labels, metric)
TASKS = {
    "sst2": (("sentence",), 2, "acc"),
    "cola": (("sentence",), 2, "mcc"),
    "mrpc": (("sentence1", "sentence2"), 2, "f1"),
    "qnli": (("question", "sentence"), 2, "acc"),
    "rte": (("sentence1", "sentence2"), 2, "acc"),
    "mnli": (("premise", "hypothesis"), 3, "acc"),
}
MNLI_LABELS = {"entailment": 0, "neutral": 1, "contradiction": 2}
QNLI_LABELS = {"entailment": 0, "not_entailment": 1}


def parse_glue_tsv(task: str, path: str) -> tuple[list[tuple[str, ...]], list[int]]:
    """Texts and integer labels from an official GLUE TSV file."""
    with open(path, encoding="utf-8-sig") as f:
        rows = [line.rstrip("\n").split("\t") for line in f if line.strip()]
    if task == "cola":
        return [(r[3],) for r in rows], [int(r[1]) for r in rows]
    header, body = rows[0], rows[1:]
    if task == "sst2":
        return [(r[0],) for r in body], [int(r[1]) for r in body]
    if task == "mrpc":
        return [(r[3], r[4]) for r in body], [int(r[0]) for r in body]
    if task in ("qnli", "rte"):
        return [(r[1], r[2]) for r in body], [QNLI_LABELS[r[-1]] for r in body]
    if task == "mnli":
        i1, i2 = header.index("sentence1"), header.index("sentence2")
        return [(r[i1], r[i2]) for r in body], [MNLI_LABELS[r[-1]] for r in body]
    raise ConfigError(f"data.task={task!r}; allowed: {sorted(TASKS)}")


class EncodedDataset(Dataset):
    def __init__(self, enc: dict, labels: list[int]) -> None:
        self.enc, self.labels = enc, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        item = {k: v[i] for k, v in self.enc.items()}
        item["labels"] = self.labels[i]
        return item


class GLUEDataModule(QDataModule):
    def __init__(
        self, task: str = "sst2", root: str | None = None, tokenizer: str = "bert-base-uncased",
        max_length: int = 128, hf: bool = False, max_train_samples: int | None = None,
        max_eval_samples: int | None = None, **kw,
    ) -> None:
        super().__init__(root=root, **kw)
        if task not in TASKS:
            raise ConfigError(f"data.task={task!r}; allowed: {sorted(TASKS)}")
        self.task, self.tokenizer_name, self.max_length, self.hf = task, tokenizer, max_length, hf
        self.num_classes = TASKS[task][1]
        self.metric = TASKS[task][2]
        self.max_train_samples, self.max_eval_samples = max_train_samples, max_eval_samples
        self.tokenizer = None

    def dev_file(self) -> str:
        if self.task == "cola" and self._cola_public():
            return "in_domain_dev.tsv"
        return "dev_matched.tsv" if self.task == "mnli" else "dev.tsv"

    def train_file(self) -> str:
        return "in_domain_train.tsv" if self.task == "cola" and self._cola_public() else "train.tsv"

    def _cola_public(self) -> bool:
        """CoLA's public release (cola_public/raw) names its files in_domain_{train,dev}.tsv."""
        root = self.root or ""
        return (not os.path.exists(os.path.join(root, "train.tsv"))
                and os.path.exists(os.path.join(root, "in_domain_train.tsv")))

    def write_fake(self, root: str) -> None:
        g = torch.Generator().manual_seed(self.seed)
        words = "the a movie film good bad is was not very and".split()

        def sent():
            k = int(torch.randint(3, 9, (1,), generator=g))
            return " ".join(words[int(i)] for i in torch.randint(0, len(words), (k,), generator=g))

        for fname, n in (("train.tsv", 48), (self.dev_file(), 16)):
            labels = torch.randint(0, self.num_classes, (n,), generator=g).tolist()
            lines = []
            if self.task == "sst2":
                lines = ["sentence\tlabel"] + [f"{sent()}\t{y}" for y in labels]
            elif self.task == "cola":
                lines = [f"gj04\t{y}\t{'' if y else '*'}\t{sent()}" for y in labels]
            elif self.task == "mrpc":
                lines = ["Quality\t#1 ID\t#2 ID\t#1 String\t#2 String"]
                lines += [f"{y}\t{i}\t{i + 1}\t{sent()}\t{sent()}" for i, y in enumerate(labels)]
            elif self.task in ("qnli", "rte"):
                inv = {v: k for k, v in QNLI_LABELS.items()}
                lines = ["index\tq\ts\tlabel"] + [f"{i}\t{sent()}\t{sent()}\t{inv[y]}" for i, y in enumerate(labels)]
            else:  # mnli: 12 columns, sentence1/2 at 8/9, gold label last
                inv = {v: k for k, v in MNLI_LABELS.items()}
                head = ["index", "promptID", "pairID", "genre", "s1bp", "s2bp", "s1p", "s2p",
                        "sentence1", "sentence2", "label1", "gold_label"]
                lines = ["\t".join(head)] + [
                    "\t".join([str(i), "0", "0", "fiction", "", "", "", "", sent(), sent(), inv[y], inv[y]])
                    for i, y in enumerate(labels)
                ]
            with open(os.path.join(root, fname), "w") as f:
                f.write("\n".join(lines) + "\n")

    def _raw_splits(self):
        if self.hf:
            require_network(f"data.hf=true (glue/{self.task})", "data.root")
            require("datasets", "data.hf=true")
            from datasets import load_dataset

            ds = load_dataset("glue", self.task)
            cols = TASKS[self.task][0]
            dev = "validation_matched" if self.task == "mnli" else "validation"
            return [([tuple(r[c] for c in cols) for r in ds[s]], list(ds[s]["label"]))
                    for s in ("train", dev)]
        self.require_root(self.train_file(), self.dev_file())
        return [parse_glue_tsv(self.task, os.path.join(self.root, f))
                for f in (self.train_file(), self.dev_file())]

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        require("transformers", "GLUE data (a transformers tokenizer)")
        from transformers import AutoTokenizer, DataCollatorWithPadding

        from qtrain.models.hf import resolve_pretrained

        self.tokenizer = AutoTokenizer.from_pretrained(resolve_pretrained(self.tokenizer_name, "data.tokenizer"))
        self.collate_fn = DataCollatorWithPadding(self.tokenizer)
        (tr_x, tr_y), (dv_x, dv_y) = self._raw_splits()
        if self.max_train_samples:
            tr_x, tr_y = tr_x[: self.max_train_samples], tr_y[: self.max_train_samples]
        if self.max_eval_samples:
            dv_x, dv_y = dv_x[: self.max_eval_samples], dv_y[: self.max_eval_samples]

        def encode(texts):
            cols = list(zip(*texts))
            return self.tokenizer(*cols, truncation=True, max_length=self.max_length)

        self.train_set = EncodedDataset(encode(tr_x), tr_y)
        self.val_set = self.test_set = EncodedDataset(encode(dv_x), dv_y)
