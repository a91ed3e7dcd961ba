"""Loaders on the real datasets in ../shared/data (slow; skipped where the folder is absent).
Counts are the published ones (shared/data/README.md)."""

from pathlib import Path

import pytest

from qtrain.data.glue import parse_glue_tsv
from qtrain.data.text_lm import LMDataModule

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not SHARED.exists(), reason="../shared/data not present")]


def test_ptb_token_counts_match_mikolov_release():
    dm = LMDataModule(name="ptb", root=str(SHARED / "ptb"), seq_len=1)
    dm.setup()
    # 929,589 / 73,760 / 82,430 tokens incl. <eos>; 10,000-word vocabulary (+ our <unk>/<eos>
    # already in it: PTB's own '<unk>' token is the same symbol)
    assert [len(s) + 1 for s in (dm.train_set, dm.val_set, dm.test_set)] == [929589, 73760, 82430]
    assert len(dm.vocab) == 10000


def test_wikitext2_valid_test_counts():
    dm = LMDataModule(name="wikitext2", root=str(SHARED / "wikitext-2"), seq_len=1,
                      train_file="wiki.valid.tokens")
    dm.setup()
    assert len(dm.val_set) + 1 == 217646 and len(dm.test_set) + 1 == 245569


def test_cola_public_release_layout_is_found():
    from qtrain.data.glue import GLUEDataModule

    dm = GLUEDataModule(task="cola", root=str(SHARED / "glue" / "CoLA"))
    assert (dm.train_file(), dm.dev_file()) == ("in_domain_train.tsv", "in_domain_dev.tsv")
    assert len(parse_glue_tsv("cola", str(SHARED / "glue" / "CoLA" / dm.train_file()))[1]) == 8551


def test_glue_counts():
    x, y = parse_glue_tsv("sst2", str(SHARED / "glue" / "SST-2" / "train.tsv"))
    assert len(x) == len(y) == 67349 and set(y) == {0, 1}
    assert len(parse_glue_tsv("sst2", str(SHARED / "glue" / "SST-2" / "dev.tsv"))[1]) == 872
    assert len(parse_glue_tsv("cola", str(SHARED / "glue" / "CoLA" / "in_domain_dev.tsv"))[1]) == 527
    assert len(parse_glue_tsv("mrpc", str(SHARED / "glue" / "MRPC" / "dev.tsv"))[1]) == 408
