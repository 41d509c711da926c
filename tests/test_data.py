"""data.py: documents are packed as [BOS] text [EOS] (checked against sentencepiece itself), the token file
is reused until an input changes, the held-out split is spread and deterministic, SFT learns only the
answer and pads without changing a row's loss (lengths hide the padding even from the wrap ablation);
LongAlpaca's templates and SFT group sizes equal LongLoRA's official code (its strings and rule copied
here as the independent reference)."""

import json
import os

import numpy as np
import pytest
import sentencepiece as spm
import torch

from conftest import STDLIB, stdlib_text
from attention import _plan
from longlora.data import (PackedData, SFTData, longlora_sft_group_size, prepare_sft, prepare_tokens, sample_positions, sft_example,
                  sft_prompt, split_heldout)
from longlora.tokenizer import Tokenizer
from model import Transformer, preset
from train import token_loss_sum



def test_documents_are_joined_as_bos_text_eos_and_packed_into_overlapping_windows(sp_model, tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "a.txt").write_text(open(os.path.join(STDLIB, "colorsys.py")).read())
    (folder / "b.txt").write_text(open(os.path.join(STDLIB, "bisect.py")).read())
    (folder / "empty.txt").write_text("\n\n")  # no document at all, not a BOS/EOS pair
    texts = [open(os.path.join(STDLIB, n)).read()[:3000] for n in ("heapq.py", "keyword.py")]
    jsonl = tmp_path / "more.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))

    tok = Tokenizer(sp_model)
    tokens = prepare_tokens([str(folder), str(jsonl)], tok, str(tmp_path / "t.bin"))
    sp = spm.SentencePieceProcessor(model_file=sp_model)  # the reference: sentencepiece itself
    docs = [(folder / "a.txt").read_text(), (folder / "b.txt").read_text(), *texts]
    expected = np.concatenate([[sp.bos_id()] + sp.encode(d) + [sp.eos_id()] for d in docs])
    assert tokens.dtype == np.uint16 and np.array_equal(np.asarray(tokens), expected)
    meta = json.load(open(str(tmp_path / "t.bin.json")))
    assert meta["n_docs"] == 4 and meta["vocab_size"] == 512 and meta["n_tokens"] == len(expected)
    # where document 2 starts, EOS closes document 1
    start2 = len(sp.encode(docs[0])) + 2
    assert (tokens[start2 - 1], tokens[start2]) == (sp.eos_id(), sp.bos_id())
    assert sp.decode(tokens[start2:start2 + 40].tolist()) == docs[1][:len(sp.decode(tokens[start2:start2 + 40].tolist()))]

    ctx = 64
    data = PackedData(tokens, ctx)
    x, y, lengths = data.batch(range(len(data)))
    assert len(data) == (len(tokens) - 1) // ctx and lengths is None
    assert torch.equal(y[:, :-1], x[:, 1:])  # targets are the inputs shifted by one
    assert torch.equal(y[:-1, -1], x[1:, 0])  # window i's last target is window i+1's first input
    stream = torch.cat([x.flatten(), y[-1, -1:]])
    assert np.array_equal(stream.numpy(), expected[:len(data) * ctx + 1])  # no token lost or repeated


def test_token_file_is_reused_until_an_input_changes(sp_model, tmp_path):
    doc = tmp_path / "doc.txt"
    doc.write_text(stdlib_text(("bisect.py",)))
    tok = Tokenizer(sp_model)
    first = np.asarray(prepare_tokens([str(doc)], tok, str(tmp_path / "t.bin"))).copy()

    class Refuses(Tokenizer):
        def encode(self, *a, **k):
            raise AssertionError("tokenized again")

    again = prepare_tokens([str(doc)], Refuses(sp_model), str(tmp_path / "t.bin"))
    assert np.array_equal(np.asarray(again), first)
    doc.write_text(stdlib_text(("bisect.py",)) + "\n# one more line\n")
    with pytest.raises(AssertionError, match="tokenized again"):
        prepare_tokens([str(doc)], Refuses(sp_model), str(tmp_path / "t.bin"))


def test_heldout_split_is_deterministic_disjoint_and_spread_over_the_corpus():
    train_ids, held = split_heldout(1000, 0.05)
    assert len(held) == 50 and len(train_ids) == 950
    assert set(train_ids).isdisjoint(held) and set(train_ids) | set(held) == set(range(1000))
    assert np.diff(held).max() <= 2 * 1000 / 50 and held[0] < 40 and held[-1] > 960
    assert np.array_equal(split_heldout(1000, 0.05)[1], held)
    assert len(split_heldout(1, 0.5)[1]) == 0 and len(split_heldout(5, 0.01)[1]) == 1


def test_sample_order_is_a_fresh_permutation_each_epoch_drawn_from_the_seed():
    n = 50
    first_two_epochs = sample_positions(n, 0, 0, 2 * n)
    e0, e1 = first_two_epochs[:n], first_two_epochs[n:]
    assert sorted(e0) == sorted(e1) == list(range(n)) and list(e0) != list(e1)  # every item once per epoch
    assert list(sample_positions(n, 0, 37, 20)) == list(first_two_epochs[37:57])  # a function of the position
    assert list(sample_positions(n, 1, 0, n)) != list(e0)  # and of the seed


def test_sft_learns_only_the_answer_pads_to_a_multiple_of_8_and_the_padding_never_reaches_the_loss(sp_model, tmp_path):
    doc = open(os.path.join(STDLIB, "bisect.py")).read()
    recs = [{"instruction": "Summarize this module.", "input": doc[:400], "output": "Binary search helpers."},
            {"instruction": "What does insort do?", "output": doc[400:1200]},
            {"instruction": "Name a function.", "input": "", "output": "bisect_left"}]
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    tok = Tokenizer(sp_model)
    tokens, index = prepare_sft([str(path)], tok, str(tmp_path / "sft.bin"))
    sp = spm.SentencePieceProcessor(model_file=sp_model)
    ctx = 512
    data = SFTData(tokens, index, ctx, 8, tok.eos_id)
    x, y, lengths = data.batch([0, 1, 2])
    T = x.shape[1]
    assert T % 8 == 0 and T <= ctx
    for b, rec in enumerate(recs):
        n = int(lengths[b])
        masked = int((y[b, :n] == -100).sum())  # target t is token t+1: the prompt's tokens after the first
        assert (y[b, :masked] == -100).all() and (y[b, masked:n] != -100).all()
        learned = y[b, masked:n].tolist()
        prompt = x[b, :masked + 1].tolist()  # the last prompt token is the input that predicts the answer
        assert learned[-1] == sp.eos_id() and sp.decode(learned[:-1]) == rec["output"].strip()[:len(sp.decode(learned[:-1]))]
        assert prompt[0] == sp.bos_id() and sp.decode(prompt[1:]).startswith("[INST] " + rec["instruction"])
        assert sp.decode(prompt[1:]).endswith("[/INST]") and ("\n\n" in sp.decode(prompt)) == bool(rec.get("input"))
        assert (y[b, n:] == -100).all() and (x[b, n:] == tok.eos_id).all()  # padding: no loss, pad input
        if b == 1:  # a long answer is cut at ctx + 1 tokens, the prompt kept whole
            assert n == min(ctx, int(index[1, 2]) - 1)
    # lengths hide the padded keys: with S²'s cyclic roll (--shift-wrap) the first half-group of the shifted
    # heads sees the last positions, here padding; whatever the pad tokens are, the short row's loss is the
    # same (causality alone hides right padding from every other attention, so this is where lengths matter)
    n = int(lengths[2])
    g = 2 * n  # the whole short row lies in the first half-group, which the roll joins with the last g/2 positions
    model = Transformer(preset("tiny", vocab_size=512, attn="s2", group_size=g, shift_wrap=True)).eval()
    other_pad = x[2:].clone()
    other_pad[0, n:] = torch.arange(T - n) % 500 + 3
    nograd = torch.autocast("cpu", enabled=False)
    with torch.no_grad():
        loss = token_loss_sum(model, x[2:], y[2:], lengths[2:], nograd)
        assert T - n >= g // 2 and torch.allclose(token_loss_sum(model, other_pad, y[2:], lengths[2:], nograd), loss, atol=1e-5)
        # the probe can fail: without lengths the pad tokens reach the loss
        assert (token_loss_sum(model, other_pad, y[2:], None, nograd) - loss).abs() > 1e-3


def test_sft_batch_pads_to_the_least_multiple_that_holds_the_longest_row_and_cuts_examples_at_ctx_plus_one():
    """SFTData on a hand-made index: row b holds example b's first min(n, ctx + 1) tokens as input and target
    shifted by one, T is the smallest multiple of 8 (or ctx) that holds the longest row."""
    tokens = np.arange(1000, 2000)  # token i is 1000 + i: every slice says where it came from
    ctx = 40
    for lengths, T in (([17, 5], 16), ([18, 5], 24), ([9, 33], 32), ([100, 3], 40), ([41, 42], 40)):
        starts = np.cumsum([0, *lengths[:-1]])
        index = np.array([(s, 2, n) for s, n in zip(starts, lengths)], dtype=np.int64)
        x, y, lens = SFTData(tokens, index, ctx, 8, pad_id=0).batch([0, 1])
        assert x.shape == (2, T), (lengths, x.shape)
        for b, (s, n) in enumerate(zip(starts, lengths)):
            m = min(n, ctx + 1) - 1  # inputs of an example of n tokens cut at ctx + 1
            assert lens[b] == m
            assert x[b, :m].tolist() == list(range(1000 + s, 1000 + s + m))
            assert y[b, 1:m].tolist() == list(range(1001 + s + 1, 1001 + s + m))  # (target 0 is a prompt token)


# LongLoRA's supervised-fine-tune.py (dvlab-research/LongLoRA, PROMPT_DICT, lines 69-75), copied verbatim:
# SupervisedDataset uses "prompt_input_llama2" when a record's input is not "", else "prompt_llama2" (line 187).
OFFICIAL_PROMPT_INPUT = (
    "[INST] <<SYS>>\n"
    "You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, while being safe.  Your answers should not include any harmful, unethical, racist, sexist, toxic, dangerous, or illegal content. Please ensure that your responses are socially unbiased and positive in nature.\n\n"
    "If a question does not make any sense, or is not factually coherent, explain why instead of answering something not correct. If you don't know the answer to a question, please don't share false information.\n"
    "<</SYS>> \n\n {instruction} \n{input} [/INST]"
)
OFFICIAL_PROMPT_NO_INPUT = "[INST]{instruction}[/INST]"


def test_longalpaca_template_is_supervised_fine_tunes_text_and_tokenization(sp_model):
    tok, sp = Tokenizer(sp_model), spm.SentencePieceProcessor(model_file=sp_model)
    recs = [{"instruction": " Summarize the paper below. ", "input": "Paper text\n", "output": " It extends LLaMA2."},
            {"instruction": "Who wrote bisect.py?", "input": "", "output": "Tim Peters, says its header."},
            {"instruction": "Name a function.", "output": "bisect_left"}]
    for rec in recs:
        official = (OFFICIAL_PROMPT_INPUT if rec.get("input", "") != "" else OFFICIAL_PROMPT_NO_INPUT).format_map(rec)
        assert sft_prompt(rec, "longalpaca") == official
        # preprocess(): source + target tokenized as one text with BOS, target = output + EOS; the first
        # len(tokenized source) tokens get no loss
        ids, n_prompt = sft_example(tok, rec, "longalpaca")
        assert ids == [sp.bos_id()] + sp.encode(official + rec["output"]) + [sp.eos_id()]
        assert n_prompt == 1 + len(sp.encode(official))
    assert sft_prompt(recs[0], "llama2") == "[INST] Summarize the paper below.\n\nPaper text [/INST]"  # ours, stripped


def official_sft_segments(q_len):
    """llama_attn_replace_sft.py, forward_flashattn (lines 102-117), for one row without padding: the
    cu_seqlens it builds over the two halves of the heads, as segments [plain heads, shifted heads]."""
    group_size = int(q_len * (1 / 4)) if q_len % 4096 == 0 else 8192  # group_size_ratio = 1/4, sft_group_size = 8192
    bsz, max_s = 1, q_len
    cu_q_lens = torch.tensor([0, q_len, 2 * q_len], dtype=torch.int32)  # unpad_input of 2 rows of q_len tokens
    tmp = torch.arange(0, max_s, group_size, dtype=cu_q_lens.dtype)
    tmp2 = tmp + group_size // 2
    tmp2[tmp2 >= max_s] = torch.iinfo(tmp2.dtype).min
    tmp = torch.stack([tmp, tmp2]).repeat(bsz, 1) + cu_q_lens[:-1].unsqueeze(-1)
    cu = torch.cat([tmp, cu_q_lens[1:].unsqueeze(-1)], dim=-1).view(-1)
    cu = cu[cu >= 0].tolist()
    return [[(a, e) for a, e in zip(cu, cu[1:]) if a < q_len and e <= q_len],  # the plain heads' row
            [(a - q_len, e - q_len) for a, e in zip(cu, cu[1:]) if a >= q_len]]  # the shifted heads' row


@pytest.mark.parametrize("q_len", [100, 1000, 4095, 4096, 5000, 8192, 8200, 12288, 16000, 16384, 32768])
def test_sft_group_size_cuts_every_batch_where_longlora_sft_does(q_len):
    g = longlora_sft_group_size(q_len)
    ours = [[(a, e) for a, e, _, _ in half] for half in _plan("s2", q_len, g, 0, False)]
    assert ours == official_sft_segments(q_len)


@pytest.mark.parametrize("name", ["DATA.JSONL", "Data.Json"])
def test_record_files_are_recognised_in_any_case_of_their_extension(sp_model, tmp_path, name):
    """DATA.JSONL holds records: what is trained on is their `text`, not the JSON syntax around it."""
    texts = ["The first document.", "A second one, longer than the first."]
    path = tmp_path / name
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts) if name.lower().endswith("l")
                    else json.dumps([{"text": t} for t in texts]))
    tok = Tokenizer(sp_model)
    tokens = prepare_tokens([str(path)], tok, str(tmp_path / "tokens.bin"))
    want = [i for t in texts for i in tok.encode(t, bos=True, eos=True)]
    assert tokens.tolist() == want


def test_chat_template_sft_is_transformers_conversation_with_the_loss_on_the_assistants_turn(hf_tokenizer, tmp_path):
    """--sft-template chat: the example is the conversation [user, assistant] as transformers' apply_chat_template
    tokenizes it, and the prompt (no loss) is the user turn with the generation prompt, sample.py --chat's prompt."""
    from transformers import AutoTokenizer

    hf, tok = AutoTokenizer.from_pretrained(hf_tokenizer), Tokenizer(hf_tokenizer)
    recs = [{"instruction": " Summarize this module. ", "input": "def f(): pass\n", "output": " It defines f.\n"},
            {"instruction": "Name a function.", "output": "bisect_left"}]
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    tokens, index = prepare_sft([str(path)], tok, str(tmp_path / "sft.bin"), "chat")
    for rec, (start, n_prompt, n) in zip(recs, index):
        user = rec["instruction"].strip() + (f"\n\n{rec['input'].strip()}" if rec.get("input") else "")
        turn = [{"role": "user", "content": user}]
        chat = turn + [{"role": "assistant", "content": rec["output"].strip()}]
        assert tokens[start:start + n].tolist() == hf.apply_chat_template(chat, return_dict=False)
        assert tokens[start:start + n_prompt].tolist() == hf.apply_chat_template(turn, add_generation_prompt=True, return_dict=False)
        assert tok.decode(tokens[start + n_prompt:start + n]) == rec["output"].strip() + "<|im_end|>\n"


def test_a_template_sft_without_a_chat_template_is_refused(sp_model, tmp_path):
    path = tmp_path / "sft.jsonl"
    path.write_text(json.dumps({"instruction": "Hi", "output": "Hello"}) + "\n")
    with pytest.raises(ValueError, match="no chat template .* for --sft-template chat"):
        prepare_sft([str(path)], Tokenizer(sp_model), str(tmp_path / "sft.bin"), "chat")


def test_another_tokenizer_config_is_another_token_file(hf_tokenizer, tmp_path):
    """The cache key holds every tokenizer file: the same tokenizer.json with another BOS in tokenizer_config.json
    tokenizes the same documents again, into other tokens."""
    import shutil

    doc = tmp_path / "doc.txt"
    doc.write_text(stdlib_text(("bisect.py",)))
    shutil.copytree(hf_tokenizer, tmp_path / "tok")
    first = np.asarray(prepare_tokens([str(doc)], Tokenizer(str(tmp_path / "tok")), str(tmp_path / "t.bin"))).copy()
    config = json.load(open(tmp_path / "tok" / "tokenizer_config.json"))
    config["eos_token"] = "<|endoftext|>"
    (tmp_path / "tok" / "tokenizer_config.json").write_text(json.dumps(config))
    tok = Tokenizer(str(tmp_path / "tok"))
    again = np.asarray(prepare_tokens([str(doc)], tok, str(tmp_path / "t.bin")))
    assert again[-1] == tok.eos_id != first[-1]
    assert np.array_equal(again, tok.encode(doc.read_text(), bos=True, eos=True))
