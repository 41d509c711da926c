"""Shared fixtures: real text from the Python standard library, and a tokenizer trained on it."""

import os
import sys
import sysconfig

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

STDLIB = sysconfig.get_paths()["stdlib"]


def stdlib_text(names=("argparse.py", "dataclasses.py", "pathlib.py", "typing.py")) -> str:
    """Real, long documents that are on every machine with Python."""
    return "\n".join(open(os.path.join(STDLIB, n), encoding="utf-8").read() for n in names)


@pytest.fixture(scope="session")
def sp_model(tmp_path_factory) -> str:
    """A sentencepiece BPE model trained with LLaMA's settings (byte fallback, split digits) on stdlib text."""
    import sentencepiece as spm

    d = tmp_path_factory.mktemp("tok")
    corpus = d / "corpus.txt"
    corpus.write_text(stdlib_text(), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(d / "tokenizer"), model_type="bpe", vocab_size=512,
        byte_fallback=True, split_digits=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, character_coverage=1.0,
        bos_id=1, eos_id=2, unk_id=0, pad_id=-1, num_threads=2, minloglevel=2,
    )
    return str(d / "tokenizer.model")
