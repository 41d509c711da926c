"""eval.py: both perplexity protocols against a hand computation on a model with known logits, the
passkey prompt's layout, passkey scoring with an oracle and a failing model, and the CLI."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from conftest import stdlib_text
from longlora.tokenizer import Tokenizer
from model import Transformer, TransformerBlock, preset
from longlora import eval as ev


class KnownLogits(nn.Module):
    """logits[b, t] = table[token at t] + t * slope: known, and they depend on the position inside the
    window, so scoring a token in the wrong window (or at the wrong place) changes the answer."""

    def __init__(self, vocab=11, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.table = nn.Parameter(torch.randn(vocab, vocab, generator=g))
        self.slope = torch.randn(vocab, generator=g) * 0.05

    def forward(self, tokens):
        T = tokens.shape[1]
        return self.table[tokens] + torch.arange(T)[None, :, None] * self.slope  # (B, T, V)


def nll_by_hand(model, window):
    """-log p(window[t+1] | window[:t+1]) for t = 0 .. L-2, one Python float at a time."""
    logits = model(torch.tensor([window]))[0].double()
    out = []
    for t in range(len(window) - 1):
        row = logits[t]
        out.append(-(row[window[t + 1]] - math.log(sum(math.exp(x) for x in row.tolist()))).item())
    return out


def test_window_starts_are_longloras_with_the_last_dropped_and_every_full_window_without_stride():
    # LongLoRA: range(0, 1000 - 256, 256) = [0, 256, 512], then all_ix.pop() drops 512
    assert ev.window_starts(1000, 256, 256) == [0, 256]
    assert ev.window_starts(1000, 100, 300) == [0, 300]  # range(0, 900, 300) = [0, 300, 600]
    assert ev.window_starts(1000, 256) == [0, 256, 512]
    assert ev.window_starts(768, 256) == [0, 256, 512]
    with pytest.raises(ValueError, match="too few"):
        ev.window_starts(512, 256, 256)  # range(0, 256, 256) = [0], popped: nothing left


@pytest.mark.parametrize("seq_len,stride", [(256, 256), (100, 7), (64, None)])
def test_too_few_tokens_names_the_least_count_that_gives_a_window(seq_len, stride):
    with pytest.raises(ValueError, match="too few") as refused:
        ev.window_starts(seq_len - 1, seq_len, stride)
    need = int(str(refused.value).split("need at least ")[1].rstrip(")"))
    assert len(ev.window_starts(need, seq_len, stride)) == 1  # the count it names works
    with pytest.raises(ValueError, match="too few"):
        ev.window_starts(need - 1, seq_len, stride)  # and one token less does not


@pytest.mark.parametrize("batch_size", [1, 3])
def test_longlora_protocol_is_the_mean_of_window_mean_losses_over_overlapping_windows(batch_size):
    model = KnownLogits()
    tokens = torch.randint(0, 11, (90,), generator=torch.Generator().manual_seed(1)).tolist()
    L, s = 20, 7
    # by hand: windows at 0, 7, ..., < 90 - 20 = 70, i.e. 0..63, the last (63) dropped
    window_losses = [sum(nll_by_hand(model, tokens[i:i + L])) / (L - 1) for i in range(0, 63, s)]
    expected = math.exp(sum(window_losses) / len(window_losses))
    r = ev.perplexity(model, np.array(tokens), L, stride=s, batch_size=batch_size)
    assert r["windows"] == 9 and r["scored"] == 9 * 19
    assert r["ppl"] == pytest.approx(expected, rel=1e-5)


def test_non_overlapping_protocol_scores_each_window_once():
    model = KnownLogits(seed=2)
    tokens = torch.randint(0, 11, (95,), generator=torch.Generator().manual_seed(2)).tolist()
    nll = [x for i in (0, 20, 40, 60) for x in nll_by_hand(model, tokens[i:i + 20])]  # 95 - 80 = 15 left over
    r = ev.perplexity(model, tokens, 20)
    assert r["windows"] == 4 and r["scored"] == len(nll) == 76
    assert r["ppl"] == pytest.approx(math.exp(sum(nll) / len(nll)), rel=1e-5)


@pytest.mark.parametrize("stride", [None, 7])
def test_loss_by_position_is_the_mean_over_windows_of_each_spans_predictions(stride):
    model = KnownLogits(seed=3)  # its logits depend on the position, so every span has its own loss
    tokens = torch.randint(0, 11, (95,), generator=torch.Generator().manual_seed(3)).tolist()
    L = 20
    starts = ev.window_starts(95, L, stride)
    by_hand = [nll_by_hand(model, tokens[i:i + L]) for i in starts]  # [window][t]: the token at position t + 1
    r = ev.perplexity(model, tokens, L, stride=stride, buckets=3)
    assert r["positions"] == [0, 7, 13, 20]  # round(20 k / 3)
    for (lo, hi), got in zip([(1, 7), (7, 13), (13, 20)], r["position_loss"]):
        span = [w[t - 1] for w in by_hand for t in range(lo, hi)]
        assert got == pytest.approx(sum(span) / len(span), rel=1e-6)
    assert r["ppl"] == pytest.approx(ev.perplexity(model, tokens, L, stride=stride)["ppl"], rel=1e-12)
    with pytest.raises(ValueError, match="position buckets"):
        ev.perplexity(model, tokens, L, buckets=11)  # more than L / 2: a span without a predicted token


def test_windows_longer_than_a_scoring_slice_score_every_prediction():
    """perplexity scores a window's log-softmax 4096 positions at a time: windows of 4098 and 8193 tokens (a last
    slice of one prediction, and slices of exactly 4096) against one float64 log-softmax over the whole window."""
    model = KnownLogits(seed=4)
    for L in (4098, 8193):
        tokens = torch.randint(0, 11, (L + 5,), generator=torch.Generator().manual_seed(L)).numpy()
        window = torch.from_numpy(tokens[:L]).long()
        logp = model(window[None])[0].double().log_softmax(-1)  # (L, V)
        nll = -logp[:-1].gather(1, window[1:, None]).squeeze(1)  # the L - 1 predictions
        r = ev.perplexity(model, tokens, L)
        assert r["windows"] == 1 and r["scored"] == L - 1
        assert r["loss"] == pytest.approx(nll.mean().item(), rel=1e-6)


def test_uniform_logits_give_the_vocabulary_size_under_both_protocols():
    class Uniform(nn.Module):
        def __init__(self):
            super().__init__()
            self.p = nn.Parameter(torch.zeros(1))

        def forward(self, tokens):
            return torch.zeros(*tokens.shape, 37)

    tokens = np.random.default_rng(0).integers(0, 37, 500)
    assert ev.perplexity(Uniform(), tokens, 64, stride=16)["ppl"] == pytest.approx(37.0, rel=1e-6)
    assert ev.perplexity(Uniform(), tokens, 64)["ppl"] == pytest.approx(37.0, rel=1e-6)


def test_perplexity_uses_full_attention_and_restores_the_models_setting():
    torch.manual_seed(0)
    model = Transformer(preset("tiny")).eval()
    tokens = torch.randint(0, 256, (200,)).numpy()
    model.args.attn = "full"
    full = ev.perplexity(model, tokens, 64)["ppl"]
    model.args.attn = "s2"
    s2 = ev.perplexity(model, tokens, 64, attn="s2")["ppl"]
    assert ev.perplexity(model, tokens, 64)["ppl"] == full != s2
    assert model.args.attn == "s2"


# ----------------------------------------------------------------------------------------------------
# Passkey


@pytest.mark.parametrize("n_tokens,depth", [(300, 0.0), (600, 0.25), (600, 0.3), (1000, 0.5), (1500, 0.9), (800, 1.0)])
def test_passkey_prompt_has_the_requested_length_and_the_key_at_the_requested_depth(sp_model, n_tokens, depth):
    tok = Tokenizer(sp_model)
    ids, key, d = ev.passkey_prompt(tok, n_tokens, depth=depth, seed=n_tokens)
    assert len(ids) == n_tokens and d == depth and ids[0] == tok.bos_id
    assert len(key) == 5 and key.isdigit()
    lines = tok.decode(ids).split("\n")
    assert len(lines) == 5
    task, before, info, after, question = lines
    assert task == ev.TASK and question == ev.QUESTION
    assert info == f"The pass key is {key}. Remember it. {key} is the pass key."
    filler = " ".join([ev.FILLER] * 200)
    assert filler.startswith(before) and filler.startswith(after)  # both cut from the start of the filler
    # the filler tokens before and after the key, counted between the prompt's four newline tokens: p and q with
    # p = round(depth * (p + q)) (the docstring's rule)
    newline = [i for i, t in enumerate(ids) if tok.decode([t]) == "\n"]
    assert len(newline) == 4
    p, q = newline[1] - newline[0] - 1, newline[3] - newline[2] - 1
    assert p == round(depth * (p + q)), (p, q)


def test_passkey_prompt_draws_key_and_depth_from_the_seed_and_refuses_too_short_prompts(sp_model):
    tok = Tokenizer(sp_model)
    a, b, c = (ev.passkey_prompt(tok, 400, seed=s) for s in (1, 1, 2))
    assert a == b and (a[1], a[2]) != (c[1], c[2])
    keys = [ev.passkey_prompt(tok, 200, seed=s)[1] for s in range(100)]  # a random five-digit number, every time
    assert all(len(k) == 5 and k.isdigit() for k in keys) and len(set(keys)) > 90
    with pytest.raises(ValueError, match="at least"):
        ev.passkey_prompt(tok, 20)


class Copier(nn.Module):
    """An induction head: predicts the token that followed the latest earlier occurrence of the last
    four tokens. It retrieves any passkey; `shift` makes it copy one token off (always wrong).
    It keeps its own history, keyed on the KV cache generate() passes."""

    def __init__(self, vocab, shift=0):
        super().__init__()
        self.args = preset("tiny", vocab_size=vocab)  # generate() sizes its KV cache from these
        self.layers = nn.ModuleList(TransformerBlock(self.args, i) for i in range(self.args.n_layers))  # and places it by these
        self.p = nn.Parameter(torch.zeros(1))
        self.vocab, self.shift, self.seen = vocab, shift, []

    def forward(self, tokens, cache=None):
        if cache is None or cache.pos == 0:
            self.seen = []
        self.seen += tokens[0].tolist()
        if cache is not None:
            cache.pos += tokens.shape[1]
        s, nxt = self.seen, 0
        for j in range(len(s) - 2, 2, -1):
            if s[j - 3:j + 1] == s[-4:]:
                nxt = s[min(j + 1 + self.shift, len(s) - 1)]
                break
        logits = torch.zeros(1, tokens.shape[1], self.vocab)
        logits[0, -1, nxt] = 1.0
        return logits


@pytest.mark.parametrize("tokenizer", ["sp_model", "hf_tokenizer"])  # sentencepiece, byte-level BPE
def test_passkey_accuracy_is_one_for_a_model_that_retrieves_and_zero_for_one_that_does_not(tokenizer, request):
    """The answer is the key's tokens as they follow "is" in the prompt's text (" 12345" is not "12345" to a
    byte-level BPE), so a model that copies them from the key's line is right."""
    tok = Tokenizer(request.getfixturevalue(tokenizer))
    good = ev.passkey_accuracy(Copier(tok.vocab_size), tok, [300, 700], trials=3)
    assert good["accuracy"] == {300: 1.0, 700: 1.0}
    assert len(good["trials"]) == 6 and all(r["output"].strip() == r["key"] for r in good["trials"])
    bad = ev.passkey_accuracy(Copier(tok.vocab_size, shift=1), tok, [300], trials=3, depths=[0.0, 1.0])
    assert bad["accuracy"] == {300: 0.0} and sorted({r["depth"] for r in bad["trials"]}) == [0.0, 1.0]


# ----------------------------------------------------------------------------------------------------
# CLI


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, sp_model):
    d = tmp_path_factory.mktemp("tiny_eval")
    torch.manual_seed(0)
    Transformer(preset("tiny", vocab_size=512, max_seq_len=256)).save_pretrained(str(d), tokenizer_path=sp_model)
    return str(d)


def test_ppl_cli_prints_a_table_and_writes_json_equal_to_the_function(model_dir, tmp_path, capsys):
    doc = tmp_path / "doc.txt"
    doc.write_text(stdlib_text(("dataclasses.py",))[:6000], encoding="utf-8")
    out = tmp_path / "ppl.json"
    assert ev.main(["ppl", "--model", model_dir, "--data", str(doc), "--seq-lens", "32,64", "--stride", "16",
                    "--max-tokens", "600", "--position-buckets", "4", "--out", str(out)]) == 0
    table = capsys.readouterr().out
    result = json.loads(out.read_text())
    model = Transformer.from_pretrained(model_dir).eval()
    tokens = np.array(model.tokenizer.encode(doc.read_text(), bos=True, eos=True))[:600]  # train.py's packing
    for row, L in zip(result["results"], (32, 64)):
        assert row["seq_len"] == L and row["ppl"] == pytest.approx(ev.perplexity(model, tokens, L, 16)["ppl"], rel=1e-6)
        assert f"{row['ppl']:.3f}" in table
        assert row["position_loss"] == pytest.approx(ev.perplexity(model, tokens, L, 16, buckets=4)["position_loss"], rel=1e-6)
        assert f"{L * 3 // 4}-{L - 1} {row['position_loss'][-1]:.3f}" in table
    # the same tokens from a token file give the same numbers: train.py's (with its sidecar) and a raw uint16 one
    from longlora.data import prepare_tokens

    prepare_tokens([str(doc)], model.tokenizer, str(tmp_path / "train.bin"))
    tokens.astype("<u2").tofile(tmp_path / "raw.bin")
    for name in ("train.bin", "raw.bin"):
        assert ev.main(["ppl", "--model", model_dir, "--tokens", str(tmp_path / name), "--seq-lens", "32,64",
                        "--stride", "16", "--max-tokens", "600", "--out", str(tmp_path / f"again-{name}.json")]) == 0
        again = json.loads((tmp_path / f"again-{name}.json").read_text())
        assert [r["ppl"] for r in again["results"]] == pytest.approx([r["ppl"] for r in result["results"]], rel=1e-6)


def test_passkey_cli_writes_accuracy_json_and_a_png(model_dir, tmp_path, capsys):
    out, png = tmp_path / "pk.json", tmp_path / "pk.png"
    # depth 1.0 (the key right before the question) is drawn in the last row of the heat map
    assert ev.main(["passkey", "--model", model_dir, "--lengths", "200,300", "--trials", "1", "--depths", "0,1",
                    "--out", str(out), "--png", str(png)]) == 0
    result = json.loads(out.read_text())
    assert set(result["accuracy"]) == {"200", "300"} and len(result["trials"]) == 4
    assert sorted(r["depth"] for r in result["trials"]) == [0.0, 0.0, 1.0, 1.0]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("case", ["missing data", "binary data", "token file of another vocabulary", "too few tokens"])
def test_cli_fails_with_one_line_on_bad_input(model_dir, tmp_path, capsys, case):
    (tmp_path / "bin.txt").write_bytes(b"\x00\xff\xfe\x00")
    np.array([5, 70000, 3], dtype="<u4").tofile(tmp_path / "big.bin")  # read as uint16: id 70000 -> 4464 >= 512
    (tmp_path / "short.txt").write_text("just a few words")
    argv = {"missing data": ["--data", str(tmp_path / "nope.txt")],
            "binary data": ["--data", str(tmp_path / "bin.txt")],
            "token file of another vocabulary": ["--tokens", str(tmp_path / "big.bin")],
            "too few tokens": ["--data", str(tmp_path / "short.txt")]}[case]
    assert ev.main(["ppl", "--model", model_dir, "--seq-lens", "64", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1


def test_defaults_are_longloras_evaluation_protocol():
    # LongLoRA's eval.py: windows every 256 tokens (--sliding_window 256), full attention at evaluation;
    # its passkey test runs 10 prompts per length
    from longlora.eval import parse_args

    ppl = parse_args(["ppl", "--model", "m", "--data", "d"])
    assert (ppl.stride, ppl.attn) == (256, "full")
    assert parse_args(["passkey", "--model", "m"]).trials == 10


def test_rope_scaling_gives_a_config_that_states_none_its_factor_and_is_refused_where_it_states_another(
        tmp_path, capsys):
    """LongAlpaca's fully fine-tuned models ship `rope_scaling: null`: --rope-scaling F evaluates (and sample.py
    samples) them as Transformer.from_pretrained(rope_scaling=F) computes, with the context 256 x F."""
    torch.manual_seed(0)
    model = Transformer(preset("tiny", vocab_size=512, max_seq_len=256))
    with torch.no_grad():  # weights large enough that the positions matter
        for n, p in model.named_parameters():
            p.copy_(1 + 0.3 * torch.randn_like(p) if "norm" in n else 0.2 * torch.randn_like(p))
    model_dir = str(tmp_path / "model")
    model.save_pretrained(model_dir)
    tokens = np.random.default_rng(0).integers(3, 512, 4 * 128).astype("<u2")
    tokens.tofile(tmp_path / "t.bin")
    run = ["ppl", "--model", model_dir, "--tokens", str(tmp_path / "t.bin"), "--seq-lens", "128", "--stride", "0"]
    losses = {}
    for flags in ([], ["--rope-scaling", "4"]):
        capsys.readouterr()
        assert ev.main(run + flags + ["--out", str(tmp_path / f"{len(flags)}.json")]) == 0
        losses[len(flags)] = json.loads((tmp_path / f"{len(flags)}.json").read_text())["results"][0]["loss"]
    assert "model context 1024 (RoPE scaling 4)" in capsys.readouterr().out
    scaled = Transformer.from_pretrained(model_dir, rope_scaling=4.0).eval()
    reference = ev.perplexity(scaled, torch.from_numpy(tokens.astype(np.int64)), 128, None)["loss"]
    assert abs(losses[2] - reference) <= 1e-5 and abs(losses[0] - reference) > 1e-3
    stated = tmp_path / "stated"  # a model whose config says linear factor 2
    Transformer.from_pretrained(model_dir, rope_scaling=2.0, max_seq_len=512).save_pretrained(str(stated))
    assert ev.main(["ppl", "--model", str(stated), "--tokens", str(tmp_path / "t.bin"), "--seq-lens", "128", "--rope-scaling", "4"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--rope-scaling 4" in err and "linear factor 2" in err, err
