"""sample.py: KV caches (full, H₂O, attention sinks) against recomputation, the eviction policies on
hand-made attention, sampling, streaming text (sentencepiece and byte-level BPE), chat prompts (the model's
template, or LLaMA2's), and the CLI as a user runs it. (A real model against transformers: test_smollm2.py.)"""

import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, stdlib_text
from longlora.adapter import load_model, save_adapter
from longlora.caches import H2OCache, SinkCache, h2o_keep, resolve_size
from longlora.tokenizer import Tokenizer
from model import Transformer, apply_rope, preset, rope_angles, rope_frequencies
from sample import chat_prompt, generate, make_cache, sample_next, stream_text

TOL = 1e-4  # max abs logit difference between cached and uncached paths in fp32 (observed ~1e-5)


def make_model(seed=0, **overrides) -> Transformer:
    """A tiny random model whose logits are far from uniform (std 0.02 init makes every token a near-tie)."""
    torch.manual_seed(seed)
    model = Transformer(preset("tiny", **{"max_seq_len": 512, **overrides})).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(1 + 0.3 * torch.randn_like(p) if "norm" in n else 0.2 * torch.randn_like(p))
    return model


def greedy_by_recomputation(model, ids, n):
    """The obvious generator: run the whole sequence again for every new token."""
    ids = list(ids)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[-n:]


def run_with_cache(model, ids, cache, prefill, chunk):
    """Logits (1, T, V) of ids: `prefill` tokens in chunks of `chunk`, then one token at a time, through cache."""
    out = []
    with torch.no_grad():
        for s in range(0, prefill, chunk):
            out.append(model(ids[:, s:min(s + chunk, prefill)], cache=cache))
        for t in range(prefill, ids.shape[1]):
            out.append(model(ids[:, t:t + 1], cache=cache))
    return torch.cat(out, dim=1)


# ----------------------------------------------------------------------------------------------------
# Caches against the full forward


@pytest.mark.parametrize("prefill_chunk", [1, 7, 512])
def test_greedy_generation_with_kv_cache_equals_recomputing_every_step(prefill_chunk):
    model = make_model()
    prompt = torch.randint(0, 256, (23,), generator=torch.Generator().manual_seed(1)).tolist()
    ours = list(generate(model, prompt, 30, prefill_chunk=prefill_chunk))
    assert ours == greedy_by_recomputation(model, prompt, 30)


def test_generation_stops_before_the_first_eos_and_never_yields_it():
    """eos_id = the 6th token of the greedy continuation (recomputed without a cache): generate yields the tokens
    before its first occurrence, not the EOS itself, and nothing after it."""
    model = make_model()
    prompt = torch.randint(0, 256, (9,), generator=torch.Generator().manual_seed(4)).tolist()
    greedy = greedy_by_recomputation(model, prompt, 12)
    eos = greedy[5]
    assert list(generate(model, prompt, 12, eos_ids=(eos,))) == greedy[:greedy.index(eos)]
    assert list(generate(model, prompt, 12, eos_ids=())) == greedy  # no EOS: all max_new_tokens


def test_the_full_cache_holds_exactly_the_prompt_and_the_new_tokens():
    """make_cache("full") allocates prompt + max_new_tokens positions of keys and values per layer, no more (the stats'
    bytes, against the count from the shapes): generation then fills it to the last position."""
    model = make_model()
    stats = {}
    assert len(list(generate(model, list(range(1, 24)), 7, stats=stats))) == 7
    a = model.args
    assert stats["kv_cache_bytes"] == a.n_layers * 2 * (23 + 7) * a.n_kv_heads * a.head_dim * 4  # fp32


def test_cache_sizes_given_as_a_ratio_round_to_the_nearest_token_and_keep_at_least_one():
    assert resolve_size(0.1, 19) == 2 and resolve_size(0.1, 14) == 1  # 1.9 and 1.4 tokens
    assert resolve_size(0.01, 30) == 1 and resolve_size(0.0, 100) == 0  # at least one, unless the ratio is 0
    assert resolve_size(1.0, 37) == 37 and resolve_size(256, 10) == 256  # a count is a count


@pytest.mark.parametrize("kind", ["full", "h2o", "sink"])
@pytest.mark.parametrize("rope_scaling", [1.0, 4.0])
def test_caches_with_budget_covering_the_sequence_equal_one_full_forward(kind, rope_scaling):
    model = make_model(rope_scaling=rope_scaling)  # GQA: 4 query heads share 2 KV heads
    ids = torch.randint(0, 256, (2, 60), generator=torch.Generator().manual_seed(2))  # batch of 2
    with torch.no_grad():
        reference = model(ids)
    # budgets of exactly the sequence length: nothing is ever evicted
    cache = {"full": lambda: make_cache(model, "full", 60, 0, batch_size=2),
             "h2o": lambda: H2OCache(model.args, heavy=30, recent=30),
             "sink": lambda: SinkCache(model.args, sink_tokens=4, recent=56)}[kind]()
    logits = run_with_cache(model, ids, cache, prefill=41, chunk=16)
    assert (logits - reference).abs().max().item() <= TOL


@pytest.mark.parametrize("rope_scaling", [1.0, 4.0])
def test_sink_cache_covering_the_sequence_gives_the_full_caches_logits_exactly_and_h2o_within_rounding(rope_scaling):
    model = make_model(rope_scaling=rope_scaling)
    ids = torch.randint(0, 256, (2, 60), generator=torch.Generator().manual_seed(2))
    full = run_with_cache(model, ids, make_cache(model, "full", 60, 0, batch_size=2), prefill=41, chunk=16)
    sink = run_with_cache(model, ids, SinkCache(model.args, sink_tokens=4, recent=56), prefill=41, chunk=16)
    h2o = run_with_cache(model, ids, H2OCache(model.args, heavy=30, recent=30), prefill=41, chunk=16)
    assert torch.equal(sink, full)  # the same SDPA calls on the same keys
    assert (h2o - full).abs().max().item() <= TOL  # an explicit softmax instead of SDPA (observed ~1e-5)


@pytest.mark.parametrize("kind", ["h2o", "sink"])
def test_generate_with_a_budget_covering_the_sequence_equals_the_full_cache(kind):
    model = make_model(seed=3)
    prompt = torch.randint(0, 256, (40,), generator=torch.Generator().manual_seed(3)).tolist()
    full = list(generate(model, prompt, 25, prefill_chunk=16))
    # budgets count the generated tokens too: 40 + 25 = 65 <= 35 + 30 (h2o) and 4 + 61 (sink)
    budget = dict(heavy=35, recent=30) if kind == "h2o" else dict(sink_tokens=4, recent=61)
    assert list(generate(model, prompt, 25, cache=kind, prefill_chunk=16, **budget)) == full


# ----------------------------------------------------------------------------------------------------
# H₂O: the policy on hand-made scores, and the cache's bookkeeping


def test_h2o_keep_takes_the_top_scores_among_old_tokens_plus_the_recent_window():
    #                      pos: 0    1    2    3    4    5    6    7    8    9
    score = torch.tensor([[[9.0, 0.3, 2.0, 0.2, 4.2, 0.1, 0.4, 0.0, 8.0, 0.5],     # head 0
                           [0.1, 7.0, 0.2, 6.0, 0.3, 0.4, 0.5, 9.9, 9.9, 9.9]]])   # head 1
    pos = torch.arange(10).expand(1, 2, 10)
    keep = h2o_keep(score, pos, heavy=2, recent=3)  # recent = positions 7, 8, 9, whatever their score
    assert keep.tolist() == [[[0, 4, 7, 8, 9], [1, 3, 7, 8, 9]]]
    assert h2o_keep(score, pos, heavy=5, recent=5).tolist() == [[list(range(10))] * 2]  # budget >= S: keep all
    assert h2o_keep(score, pos, heavy=0, recent=2).tolist() == [[[8, 9], [8, 9]]]
    assert h2o_keep(score, pos, heavy=3, recent=0).tolist() == [[[0, 4, 8], [7, 8, 9]]]
    # entries in any order: the recent window is found by position, not by place
    perm = torch.tensor([9, 2, 0, 7, 4, 1, 8, 3, 6, 5])
    keep = h2o_keep(score[..., perm], pos[..., perm], heavy=2, recent=3)
    assert [sorted(perm[row].tolist()) for row in keep[0]] == [[0, 4, 7, 8, 9], [1, 3, 7, 8, 9]]


def identity_rotate(x, positions):
    return x


def test_h2o_scores_are_attention_received_summed_over_queries_and_the_kv_heads_query_heads():
    # q = 0 makes every query attend uniformly to what it may see: query t gives 1/(t+1) to each of
    # tokens 0..t. Two query heads share each KV head, so each score is twice the single-head sum.
    args = preset("tiny")  # 4 heads, 2 KV heads, head_dim 16
    cache = H2OCache(args, heavy=10, recent=10)
    q = torch.zeros(1, 4, 4, 16)
    k, v = torch.randn(1, 4, 2, 16), torch.randn(1, 4, 2, 16)
    cache.attend(0, q, k, v, torch.arange(4), identity_rotate)
    h = [1 + 1 / 2 + 1 / 3 + 1 / 4, 1 / 2 + 1 / 3 + 1 / 4, 1 / 3 + 1 / 4, 1 / 4]
    expected = torch.tensor([2 * x for x in h]).expand(1, 2, 4)
    assert torch.allclose(cache.score[0], expected, atol=1e-6)
    assert cache.score[0].dtype == torch.float32
    # one more token attends uniformly to 5 tokens: 2 heads x 1/5 each
    cache.attend(0, torch.zeros(1, 1, 4, 16), torch.randn(1, 1, 2, 16), torch.randn(1, 1, 2, 16),
                 torch.tensor([4]), identity_rotate)
    assert torch.allclose(cache.score[0], torch.cat([expected + 0.4, torch.full((1, 2, 1), 0.4)], -1), atol=1e-6)


def test_h2o_cache_evicts_per_kv_head_the_tokens_that_received_the_least_attention():
    # Head group 0 (query heads 0, 1) looks only at token 1, group 1 (query heads 2, 3) only at token 2:
    # a key with a large component along the query's direction takes ~all the softmax mass.
    args = preset("tiny")
    cache = H2OCache(args, heavy=1, recent=2)
    q = torch.zeros(1, 6, 4, 16)
    q[..., 0:2, 0] = 1.0  # query heads 0, 1 point along dim 0
    q[..., 2:4, 1] = 1.0  # query heads 2, 3 point along dim 1
    k = torch.zeros(1, 6, 2, 16)
    k[0, 1, 0, 0] = 60.0  # KV head 0: token 1 matches
    k[0, 2, 1, 1] = 60.0  # KV head 1: token 2 matches
    v = torch.randn(1, 6, 2, 16)
    # queries 0 and (for group 1) 1 cannot see their favourite yet; every later one attends to it
    cache.attend(0, q, k, v, torch.arange(6), identity_rotate)
    assert cache.kept[0].tolist() == [[[1, 4, 5], [2, 4, 5]]]  # heavy hitter + the 2 most recent, per head
    assert torch.equal(cache.k[0][0, 0], k[0, [1, 4, 5], 0]) and torch.equal(cache.v[0][0, 1], v[0, [2, 4, 5], 1])


def test_h2o_cache_never_exceeds_its_budget_and_always_keeps_the_recent_window():
    model = make_model(seed=4)
    ids = torch.randint(0, 256, (1, 80), generator=torch.Generator().manual_seed(4))
    cache = H2OCache(model.args, heavy=5, recent=7)
    with torch.no_grad():
        model(ids[:, :30], cache=cache)
        for t in range(30, 80):
            model(ids[:, t:t + 1], cache=cache)
            for layer in range(model.args.n_layers):
                kept = cache.kept[layer].sort(dim=-1).values  # (1, H_kv, S); entries are in no particular order
                assert kept.shape == (1, 2, 12) and cache.k[layer].shape == (1, 2, 12, 16)
                assert (kept.diff(dim=-1) > 0).all()  # distinct tokens
                assert kept[..., -7:].tolist() == [[list(range(t - 6, t + 1))] * 2]


def test_h2o_in_place_decoding_step_equals_the_readable_append_and_evict_path():
    model = make_model(seed=8)
    ids = torch.randint(0, 256, (2, 70), generator=torch.Generator().manual_seed(8))
    fast, readable = H2OCache(model.args, heavy=6, recent=4), H2OCache(model.args, heavy=6, recent=4)
    readable.in_place = False
    with torch.no_grad():
        a, b = model(ids[:, :20], cache=fast), model(ids[:, :20], cache=readable)
        for t in range(20, 70):
            a, b = model(ids[:, t:t + 1], cache=fast), model(ids[:, t:t + 1], cache=readable)
            assert (a - b).abs().max().item() <= TOL
            for layer in range(model.args.n_layers):
                assert torch.equal(fast.kept[layer].sort(-1).values, readable.kept[layer].sort(-1).values)
                order_f, order_r = fast.kept[layer].argsort(-1), readable.kept[layer].argsort(-1)
                assert torch.allclose(fast.score[layer].gather(2, order_f), readable.score[layer].gather(2, order_r), atol=1e-5)


# ----------------------------------------------------------------------------------------------------
# Attention sinks


def test_sink_cache_keeps_the_first_tokens_and_the_recent_window():
    model = make_model(seed=5)
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(5))
    cache = SinkCache(model.args, sink_tokens=4, recent=6)
    with torch.no_grad():
        model(ids[:, :8], cache=cache)  # 8 <= 10: nothing evicted yet
        assert cache.kept[0].tolist() == list(range(8))
        for t in range(8, 40):
            model(ids[:, t:t + 1], cache=cache)
            expected = list(range(t + 1)) if t < 10 else [0, 1, 2, 3] + list(range(t - 5, t + 1))
            assert all(cache.kept[layer].tolist() == expected for layer in range(model.args.n_layers))
            assert cache.k[0].shape[1] <= 10


@pytest.mark.parametrize("rope_scaling", [1.0, 2.0])
def test_sink_cache_equals_a_forward_over_the_kept_tokens_at_their_cache_positions(rope_scaling):
    # StreamingLLM's rule: a kept token is rotated by its index in the cache. In a one-layer model the
    # keys and values of a token depend only on its embedding, so each new token's logits must equal
    # those of a plain forward over [kept tokens..., new token], positions 0, 1, 2, ...
    model = make_model(seed=6, n_layers=1, rope_scaling=rope_scaling)
    ids = torch.randint(0, 256, (1, 30), generator=torch.Generator().manual_seed(6))
    cache = SinkCache(model.args, sink_tokens=3, recent=5)
    with torch.no_grad():
        model(ids[:, :4], cache=cache)
        for t in range(4, 30):
            kept = cache.kept[0].tolist()
            logits = model(ids[:, t:t + 1], cache=cache)[0, -1]
            reference = model(ids[:, kept + [t]])[0, -1]
            assert (logits - reference).abs().max().item() <= TOL


def test_sink_cache_rotates_queries_by_their_position_in_the_cache():
    # The same rule checked on one attend call with hand-made tensors and an explicit reference.
    args = preset("tiny")
    rotate = lambda x, pos: apply_rope(x, *rope_angles(pos, rope_frequencies(args)))
    cache = SinkCache(args, sink_tokens=2, recent=3)
    k, v = torch.randn(1, 20, 2, 16), torch.randn(1, 20, 2, 16)
    for t in range(20):
        q = torch.randn(1, 1, 4, 16)
        kept_before = cache.kept[0].tolist() if cache.kept[0] is not None else []
        y = cache.attend(0, q, k[:, t:t + 1], v[:, t:t + 1], torch.tensor([t]), rotate)
        visible = kept_before + [t]
        S = len(visible)
        kr = rotate(k[:, visible], torch.arange(S)).repeat_interleave(2, dim=2)  # (1, S, 4, D)
        qr = rotate(q, torch.tensor([S - 1]))
        att = torch.einsum("bthd,bshd->bhts", qr, kr).div(4.0).softmax(-1)  # sqrt(16) = 4
        ref = torch.einsum("bhts,bshd->bthd", att, v[:, visible].repeat_interleave(2, dim=2))
        assert torch.allclose(y, ref, atol=1e-5)


# ----------------------------------------------------------------------------------------------------
# Sampling and streaming


def test_sampling_stays_inside_top_k_and_the_top_p_nucleus_and_temperature_0_is_greedy():
    probs = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05])
    logits = probs.log()
    g = torch.Generator().manual_seed(0)
    top_k = {sample_next(logits, 1.0, 1.0, 2, g) for _ in range(300)}
    top_p = {sample_next(logits, 1.0, 0.6, 0, g) for _ in range(300)}  # 0.5 < 0.6 <= 0.5 + 0.2
    anything = {sample_next(logits, 1.0, 1.0, 0, g) for _ in range(600)}
    assert top_k == {0, 1} and top_p == {0, 1} and anything == {0, 1, 2, 3, 4}
    assert sample_next(torch.tensor([0.1, 3.0, 2.9]), 0.0) == 1  # temperature 0 = greedy


def test_top_p_keeps_every_token_until_the_mass_before_it_reaches_p():
    """Meta's rule: a token is dropped only when the tokens before it already hold more than top_p. Two equally
    likely tokens of probability 0.5 each at top_p 0.5: the second's predecessors hold exactly 0.5, so both stay."""
    logits = torch.tensor([0.0, 0.0, float("-inf"), float("-inf")])  # softmax: exactly 0.5, 0.5, 0, 0
    g = torch.Generator().manual_seed(0)
    assert {sample_next(logits, 1.0, 0.5, 0, g) for _ in range(200)} == {0, 1}


def test_temperature_divides_the_logits_once(monkeypatch):
    """What torch.multinomial receives is softmax(logits / T)."""
    seen = []
    draw = torch.multinomial
    monkeypatch.setattr(torch, "multinomial", lambda probs, *a, **k: seen.append(probs.clone()) or draw(probs, *a, **k))
    logits = torch.tensor([1.0, 0.5, -0.3, 2.0])
    sample_next(logits, 0.5, 1.0, 0, torch.Generator().manual_seed(0))
    torch.testing.assert_close(seen[0], torch.softmax(logits / 0.5, dim=-1), rtol=0, atol=1e-7)


def test_stream_text_pieces_join_to_the_decoded_text_and_never_show_half_a_character(sp_model):
    tok = Tokenizer(sp_model)
    text = "naïve café: 日本語の文章 and ünïcödé, then plain words."
    ids = tok.encode(text, bos=False)
    assert any(tok.sp.is_byte(i) for i in ids), "the test needs byte-fallback pieces"
    context = tok.encode("Say:", bos=True)
    pieces = list(stream_text(tok, iter(ids), context))
    assert len(pieces) > 5 and not any("\ufffd" in p for p in pieces)
    joined = "".join(pieces)
    assert tok.decode(context) + joined == tok.decode(context + ids)  # leading space kept
    assert joined.strip() == text


def test_stream_text_of_byte_level_bpe_never_shows_half_a_character(hf_tokenizer):
    """Byte-level BPE splits a character's UTF-8 bytes over tokens (🙂 is four): no piece may hold U+FFFD."""
    tok = Tokenizer(hf_tokenizer)
    text = " naïve café: 日本語の文章 🙂🙂 and ünïcödé, then plain words."
    ids = tok.encode(text, bos=False)
    assert any("\ufffd" in tok.decode([i]) for i in ids), "the test needs tokens holding part of a character"
    context = tok.apply_chat_template([{"role": "user", "content": "Say it."}])
    pieces = list(stream_text(tok, iter(ids), context))
    assert len(pieces) > 5 and not any("\ufffd" in p for p in pieces)
    assert "".join(pieces) == text


def test_generation_stops_at_any_of_the_eos_ids():
    model = make_model()
    prompt = torch.randint(0, 256, (9,), generator=torch.Generator().manual_seed(3)).tolist()
    free = list(generate(model, prompt, 12))
    stop = next(t for t in free[2:] if t not in free[:2])  # a token first generated third or later
    assert list(generate(model, prompt, 12, eos_ids={999, stop})) == free[:free.index(stop)]


def test_chat_prompt_is_the_models_template_as_transformers_renders_it(hf_tokenizer):
    from transformers import AutoTokenizer

    turn = [{"role": "user", "content": "What is RoPE?"}]
    expected = AutoTokenizer.from_pretrained(hf_tokenizer).apply_chat_template(turn, add_generation_prompt=True, return_dict=False)
    assert chat_prompt(Tokenizer(hf_tokenizer), "  What is RoPE?\n") == expected


def test_chat_prompt_is_llama2s_inst_template(sp_model):
    tok = Tokenizer(sp_model)
    ids = chat_prompt(tok, "  What is RoPE?\n")
    assert ids[0] == tok.bos_id and tok.decode(ids) == "[INST] What is RoPE? [/INST]"


# ----------------------------------------------------------------------------------------------------
# The CLI


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, sp_model):
    d = tmp_path_factory.mktemp("tiny")
    make_model(seed=7, vocab_size=512, max_seq_len=128).save_pretrained(str(d), tokenizer_path=sp_model)
    return str(d)


def run_cli(*args, stdin=None):
    return subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), *args], input=stdin,
                          capture_output=True, text=True, cwd=ROOT, timeout=120)


def test_cli_streams_the_greedy_continuation(model_dir, tmp_path):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("def main(argv=None):\n    parser = argparse.", encoding="utf-8")
    r = run_cli("--model", model_dir, "--prompt", str(prompt), "--temperature", "0", "--max-new-tokens", "24",
                "--prefill-chunk", "5")
    assert r.returncode == 0, r.stderr
    model = Transformer.from_pretrained(model_dir).eval()
    ids = model.tokenizer.encode(prompt.read_text(), bos=True)
    expected = list(generate(model, ids, 24, eos_ids=model.tokenizer.eos_ids))
    assert r.stdout == "".join(stream_text(model.tokenizer, expected, ids)) + "\n"
    assert len(r.stdout.strip()) > 0
    assert "prefill: " in r.stderr and "tok/s" in r.stderr


def test_a_prompt_and_new_tokens_that_exactly_fill_the_context_are_generated_without_a_note(model_dir):
    """The context is 128 tokens: a prompt of n tokens may ask for 128 - n new ones (no note); for one more, the
    command says it stops where the context ends."""
    tok = Transformer.from_pretrained(model_dir).tokenizer
    n = len(tok.encode("def main(argv=None):", bos=True))
    fits = run_cli("--model", model_dir, "--prompt", "def main(argv=None):", "--max-new-tokens", str(128 - n),
                   "--temperature", "0")
    assert fits.returncode == 0 and "note:" not in fits.stderr, fits.stderr
    over = run_cli("--model", model_dir, "--prompt", "def main(argv=None):", "--max-new-tokens", str(129 - n),
                   "--temperature", "0")
    assert over.returncode == 0 and f"generating at most {128 - n} tokens" in over.stderr, over.stderr


def test_a_prompt_of_exactly_the_context_is_accepted_and_one_token_more_is_refused(model_dir, capsys):
    """The context is 128 tokens: a prompt of 128 leaves no room for a new token (a note says so) but is no error;
    a prompt of 129 is one error line. (In-process: sample.main with its exit code.)"""
    from sample import main

    tok = Transformer.from_pretrained(model_dir).tokenizer
    ids = tok.encode(stdlib_text(("argparse.py",))[:3000], bos=True)
    text = {n: tok.decode(ids[1:n]) for n in (128, 129)}  # BOS + n - 1 tokens that re-encode to themselves
    assert all(tok.encode(t, bos=True) == ids[:n] for n, t in text.items())
    capsys.readouterr()
    assert main(["--model", model_dir, "--prompt", text[128], "--temperature", "0", "--max-new-tokens", "4"]) == 0
    assert "generating at most 0 tokens" in capsys.readouterr().err
    assert main(["--model", model_dir, "--prompt", text[129], "--temperature", "0", "--max-new-tokens", "4"]) == 2
    assert "the prompt has 129 tokens, more than the model's context of 128" in capsys.readouterr().err


def test_a_sink_cache_and_prefill_chunk_that_exactly_fill_the_context_are_accepted(model_dir, capsys):
    """With --kv-cache sink only the cache and the chunk being prefilled must fit the 128 positions: 4 sinks + 60 recent
    + a chunk of 64 do (the prompt itself may be longer), 4 + 61 + 64 do not."""
    from sample import main

    prompt = stdlib_text(("argparse.py",))[:600]  # about 200 tokens, more than the context
    sink = ["--model", model_dir, "--prompt", prompt, "--kv-cache", "sink", "--sink-tokens", "4", "--prefill-chunk", "64",
            "--temperature", "0", "--max-new-tokens", "2"]
    assert main(sink + ["--recent", "60"]) == 0
    capsys.readouterr()
    assert main(sink + ["--recent", "61"]) == 2
    assert "sink cache of 65 tokens + prefill chunk 64 exceeds the model's context of 128" in capsys.readouterr().err


def test_cli_chat_from_stdin_with_sink_cache(model_dir):
    r = run_cli("--model", model_dir, "--prompt", "-", "--chat", "--kv-cache", "sink", "--recent", "8",
                "--temperature", "0", "--max-new-tokens", "16", stdin="Explain dataclasses.")
    assert r.returncode == 0, r.stderr
    model = Transformer.from_pretrained(model_dir).eval()
    ids = chat_prompt(model.tokenizer, "Explain dataclasses.")
    expected = list(generate(model, ids, 16, cache="sink", recent=8, eos_ids=model.tokenizer.eos_ids))
    assert r.stdout == "".join(stream_text(model.tokenizer, expected, ids)) + "\n"


def test_adapter_is_loaded_with_its_rope_scaling_and_context(model_dir, tmp_path):
    import lora

    model = Transformer.from_pretrained(model_dir)
    lora.apply_lora(model, r=4, alpha=8)
    lora.mark_trainable(model, embed=False, norms=False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_b" in name:
                p.normal_(0, 0.5)  # a trained-looking adapter that changes the logits
    model.args.rope_scaling = 4.0
    save_adapter(model, str(tmp_path / "adapter"), ctx=512)
    loaded = load_model(model_dir, str(tmp_path / "adapter"))
    assert loaded.args.rope_scaling == 4.0 and loaded.args.max_seq_len == 512
    ids = torch.randint(0, 512, (1, 20))
    with torch.no_grad():
        assert torch.allclose(loaded(ids), model.eval()(ids), atol=1e-5)


def bad_inputs(tmp_path, model_dir, sp_model):
    """(name, argv, expected words in the error line) for each mistake a user can make."""
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "binary.txt").write_bytes(b"\x7fELF\x02\x01\x01\x00\x00\x00 header")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    (tmp_path / "long.txt").write_text(stdlib_text(("argparse.py",))[:4000])  # >> 128 tokens
    other = Transformer(preset("tiny", dim=32, n_heads=2, n_kv_heads=1, vocab_size=512))
    import lora

    lora.apply_lora(other)
    lora.mark_trainable(other, embed=False, norms=False)
    save_adapter(other, str(tmp_path / "other_adapter"), ctx=128)
    base = ["--model", model_dir, "--max-new-tokens", "4"]
    return [
        ("missing file", base + ["--prompt", str(tmp_path / "nope.txt")], ["nope.txt", "no such file"]),
        ("empty file", base + ["--prompt", str(tmp_path / "empty.txt")], ["empty"]),
        ("binary file", base + ["--prompt", str(tmp_path / "binary.txt")], ["binary"]),
        ("not utf-8", base + ["--prompt", str(tmp_path / "latin1.txt")], ["not UTF-8", "0xe9"]),
        ("prompt too long", base + ["--prompt", str(tmp_path / "long.txt")], ["tokens", "128"]),
        ("adapter for another base", base + ["--prompt", "Hi", "--adapter", str(tmp_path / "other_adapter")], ["dim"]),
        ("missing model", ["--model", str(tmp_path / "no_model"), "--prompt", "Hi"], ["no_model"]),
    ]


def test_cli_fails_cleanly_on_each_bad_input(tmp_path, model_dir, sp_model):
    cases = bad_inputs(tmp_path, model_dir, sp_model)
    procs = [subprocess.Popen([sys.executable, os.path.join(ROOT, "sample.py"), *argv], cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _, argv, _ in cases]
    for (name, _, words), p in zip(cases, procs):  # started together: the imports overlap
        out, err = p.communicate(timeout=120)
        assert p.returncode == 2, f"{name}: exit {p.returncode}, stderr {err!r}"
        assert err.count("\n") == 1 and err.startswith("error: "), f"{name}: {err!r}"
        assert all(w in err for w in words), f"{name}: {err!r} should mention {words}"
        assert out == "", name


# ----------------------------------------------------------------------------------------------------
# Decoding does no needless work


@pytest.mark.parametrize("kind", ["full", "h2o"])
def test_a_decoding_step_computes_the_rope_angles_once_for_all_layers(kind, monkeypatch):
    import model as M

    model = make_model(n_layers=3)
    calls = []
    monkeypatch.setattr(M, "rope_angles", lambda *a, **k: calls.append(a[0].tolist()) or rope_angles(*a, **k))
    cache = make_cache(model, kind, 10, 4, heavy=3, recent=3)
    run_with_cache(model, torch.randint(0, 256, (1, 12)), cache, prefill=10, chunk=10)
    assert calls == [list(range(10)), [10], [11]]  # one per forward pass, not two per layer


def test_h2o_decoding_in_bf16_makes_no_fp32_copy_of_the_cache():
    # The scores are computed in the cache's dtype and only they, (B, H_kv, n_rep, 1, S), are upcast:
    # record every tensor the decoding step creates and look for an fp32 one as large as a layer's keys.
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.fp32 = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and t.dtype == torch.float32:
                    self.fp32.append((str(func), t.numel()))
            return out

    model = make_model(dim=128, n_heads=8, n_kv_heads=2).to(torch.bfloat16)  # n_rep 4, head dim 16
    cache = make_cache(model, "h2o", 200, 2, heavy=100, recent=100)
    ids = torch.randint(0, 256, (1, 202))
    with torch.no_grad():
        model(ids[:, :200], cache=cache)
        model(ids[:, 200:201], cache=cache)  # the cache is full: the in-place step runs
        keys = cache.k[0].numel()  # (1, 2, 200, 16): 6400
        with Record() as rec:
            logits = model(ids[:, 201:202], cache=cache)
    assert cache.k[0].dtype == torch.bfloat16 and logits.dtype == torch.bfloat16
    assert max(n for _, n in rec.fp32) < keys / 2, sorted(rec.fp32, key=lambda r: -r[1])[:3]


def test_defaults_are_metas_sampling_and_streamingllms_sinks():
    # meta-llama/llama's example_chat_completion.py samples with temperature 0.6, top_p 0.9; StreamingLLM
    # keeps 4 attention-sink tokens (its start_size)
    from sample import parse_args

    a = parse_args(["--model", "m", "--prompt", "p"])
    assert (a.temperature, a.top_p, a.top_k, a.kv_cache, a.sink_tokens) == (0.6, 0.9, 0, "full", 4)


def test_a_tiny_temperature_samples_the_most_likely_token_without_overflow():
    """softmax(logits / T) for T = 1e-300 is one-hot on the argmax (it would overflow computed naively)."""
    logits = torch.tensor([1.0, 3.0, 2.9, -5.0])
    g = torch.Generator().manual_seed(0)
    assert {sample_next(logits, 1e-300, 1.0, 0, g) for _ in range(50)} == {1}
    assert {sample_next(logits, 5e-324, 0.9, 3, g) for _ in range(50)} == {1}


def test_rope_scaling_stretches_the_context_of_a_config_without_one_and_is_refused_against_another(model_dir, tmp_path,
                                                                                                    capsys):
    """model_dir states no scaling (context 128): --rope-scaling 2 gives 256 positions, so a prompt of ~120 tokens
    and 20 new ones need no note; a model that states factor 2 refuses --rope-scaling 4 in one line."""
    import sample

    (tmp_path / "p.txt").write_text("def main(argv=None):\n" + " x = 1\n" * 17)
    prompt = ["--prompt", str(tmp_path / "p.txt"), "--temperature", "0", "--max-new-tokens", "20"]
    assert sample.main(["--model", model_dir, *prompt]) == 0
    assert "generating at most" in capsys.readouterr().err
    assert sample.main(["--model", model_dir, "--rope-scaling", "2", *prompt]) == 0
    assert "generating at most" not in capsys.readouterr().err
    stated = tmp_path / "stated"
    Transformer.from_pretrained(model_dir, rope_scaling=2.0, max_seq_len=256).save_pretrained(str(stated),
                                                                                               os.path.join(model_dir, "tokenizer.model"))
    assert sample.main(["--model", str(stated), "--rope-scaling", "4", *prompt]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "states linear factor 2" in err, err
