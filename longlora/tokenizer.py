"""
Tokenizers: LLaMA's sentencepiece tokenizer.model, found next to the weights.

    tok = Tokenizer("llama-2-7b/tokenizer.model")
    ids = tok.encode("The capital of France is")       # [1, ...]: BOS first
    text = tok.decode(ids)
"""

import os
from typing import Optional

from longlora.cli import one_line


class Tokenizer:
    """LLaMA's sentencepiece tokenizer: encode(text) -> ids with BOS, decode(ids) -> text."""

    def __init__(self, model_path: str):
        import sentencepiece as spm

        if not os.path.isfile(model_path):
            raise FileNotFoundError(f"{model_path}: no such tokenizer file")
        try:
            self.sp = spm.SentencePieceProcessor(model_file=model_path)
        except (RuntimeError, OSError) as e:  # sentencepiece raises RuntimeError("Internal: ...") on a foreign file
            raise ValueError(f"{model_path}: not a sentencepiece tokenizer model ({one_line(e)})") from None
        self.path = model_path
        self.vocab_size = self.sp.vocab_size()
        self.bos_id, self.eos_id, self.pad_id = self.sp.bos_id(), self.sp.eos_id(), self.sp.pad_id()

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list:
        return [self.bos_id] * bos + self.sp.encode(text) + [self.eos_id] * eos

    def decode(self, ids) -> str:
        return self.sp.decode(list(ids))


def find_tokenizer(path) -> Optional[str]:
    """tokenizer.model next to the weights, or in the parent folder (Meta's download puts it there)."""
    for cand in (os.path.join(path, "tokenizer.model"), os.path.join(os.path.dirname(os.path.abspath(path)), "tokenizer.model")):
        if os.path.isfile(cand):
            return cand
    return None
