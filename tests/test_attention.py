"""attention.py: every backend is the dense pattern, forward and backward, and the patterns mean what they say.

The fast paths are checked against dense masked attention computed here in float64 from
attention_pattern; attention_pattern itself is checked against the module docstring's rules written as loops
and against the paper's Algorithm 1 (torch.roll) run literally. The FlashAttention-2 path runs on the
CPU with a pure-PyTorch stand-in for flash_attn_varlen_func that follows its documented semantics
(packed sequences, int32 cu_seqlens, causal mask aligned to the bottom right, GQA by head blocks).
Tolerance for float32 against the float64 reference: 1e-5 (absolute and relative), outputs and grads.
"""
import functools
import math
import os
import subprocess
import sys
import types

import pytest
import torch
import torch.nn.functional as F

import attention as A
from attention import attention, attention_pattern, resolve_group_size
from conftest import ROOT
from longlora.draw import draw_patterns

TOL = dict(rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- helpers

def flash_varlen_standin(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                         softmax_scale=None, causal=False, top_left=False):
    """flash_attn_varlen_func's documented semantics in plain PyTorch (float64 inside).

    q (total_q, H, D), k, v (total_k, H_kv, D); sequence i is q[cu_q[i]:cu_q[i+1]] against
    k[cu_k[i]:cu_k[i+1]]; with causal=True query r of a sequence sees keys c <= r + len_k - len_q (the
    mask is aligned to the bottom right); a row that sees nothing outputs zeros; query head h uses kv
    head h // (H / H_kv). top_left=True: flash-attn before 2.1, whose causal mask was aligned to the top
    left (query r sees keys c <= r), to show what that version would compute.
    """
    assert cu_seqlens_q.dtype == torch.int32 and cu_seqlens_k.dtype == torch.int32
    assert cu_seqlens_q[0] == 0 and cu_seqlens_q[-1] == q.shape[0] and cu_seqlens_k[-1] == k.shape[0]
    assert len(cu_seqlens_q) == len(cu_seqlens_k) and dropout_p == 0.0
    len_q, len_k = cu_seqlens_q.diff().tolist(), cu_seqlens_k.diff().tolist()
    assert min(len_q) >= 0 and max(len_q) == max_seqlen_q and max(len_k) == max_seqlen_k
    H, H_kv = q.shape[1], k.shape[1]
    scale = softmax_scale if softmax_scale is not None else 1 / math.sqrt(q.shape[-1])
    outs = []
    for i in range(len(len_q)):
        qi = q[cu_seqlens_q[i]:cu_seqlens_q[i + 1]].double()  # (Lq, H, D)
        ki = k[cu_seqlens_k[i]:cu_seqlens_k[i + 1]].double().repeat_interleave(H // H_kv, dim=1)  # (Lk, H, D)
        vi = v[cu_seqlens_k[i]:cu_seqlens_k[i + 1]].double().repeat_interleave(H // H_kv, dim=1)
        scores = torch.einsum("qhd,khd->hqk", qi, ki) * scale  # (H, Lq, Lk)
        if causal:
            r, c = torch.arange(len_q[i])[:, None], torch.arange(len_k[i])[None, :]
            scores = scores.masked_fill(c > r + (0 if top_left else len_k[i] - len_q[i]), float("-inf"))
        probs = scores.softmax(-1).nan_to_num(0.0)  # all-masked rows -> zeros
        outs.append(torch.einsum("hqk,khd->qhd", probs, vi))
    return torch.cat(outs).to(q.dtype)


@pytest.fixture
def flash_standin(monkeypatch):
    """Route backend='flash' to the stand-in, let it run on CPU tensors, and record what it was called with."""
    calls = []

    def varlen(*args, **kwargs):
        calls.append((args, kwargs))
        return flash_varlen_standin(*args, **kwargs)

    monkeypatch.setattr(A, "flash_varlen", lambda: (varlen, None))
    monkeypatch.setattr(A, "_flash_runs_on", lambda q: True)  # as if q were CUDA fp16/bf16
    return calls


def dense(q, k, v, allowed, lengths=None):
    """Masked softmax attention in float64: allowed (H, T, T); padded keys hidden, padded queries zero."""
    B, T, H, D = q.shape
    q, k, v = q.double(), k.double(), v.double()
    k = k.repeat_interleave(H // k.shape[2], dim=2)
    v = v.repeat_interleave(H // v.shape[2], dim=2)
    scores = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(D)
    mask = allowed[None].expand(B, H, T, T)
    if lengths is not None:
        valid = torch.arange(T)[None, :] < lengths[:, None]  # (B, T)
        mask = mask & valid[:, None, None, :]
    probs = scores.masked_fill(~mask, float("-inf")).softmax(-1).nan_to_num(0.0)
    out = torch.einsum("bhij,bjhd->bihd", probs, v)
    if lengths is not None:
        out = out * valid[:, :, None, None]
    return out


def inputs(B, T, H, H_kv, D=8, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, D, generator=g, dtype=dtype)
    k = torch.randn(B, T, H_kv, D, generator=g, dtype=dtype)
    v = torch.randn(B, T, H_kv, D, generator=g, dtype=dtype)
    return q, k, v


# (B, T, H, H_kv, group_size, sink_tokens, lengths): T not a multiple of g, GQA 1:1, 2:1, 4:1, 6:3 (odd
# kv heads), multi-query, batch > 1 with padding (one row fully padded, one cut inside a group), and an odd
# number of heads (SmolLM2's 9 query and 3 kv heads, 5:5, 3:1): one more shifted head than plain ones
CASES = [
    (1, 32, 4, 4, None, 4, None),
    (2, 37, 4, 2, 8, 4, [37, 21]),
    (3, 30, 6, 3, 6, 5, [30, 0, 11]),
    (2, 24, 4, 1, 24, 3, [17, 24]),
    (2, 19, 8, 2, 4, 1, None),
    (1, 12, 2, 2, 2, 0, [7]),
    (2, 20, 4, 2, 32, 2, [20, 9]),  # g > T (LongLoRA's SFT rule on a short batch): skipped with wrap
    (1, 24, 9, 3, 8, 2, None),
    (2, 21, 5, 5, 6, 3, [21, 10]),
    (1, 16, 3, 1, 4, 1, None),
]
MODES = [("full", False), ("s2", False), ("s2", True), ("sf", False), ("sf", True)]


# ----------------------------------------------------------------------------- equivalence with dense attention

@pytest.mark.parametrize("backend", ["reference", "sdpa", "flash"])
@pytest.mark.parametrize("mode,wrap", MODES, ids=[f"{m}{'-wrap' if w else ''}" for m, w in MODES])
def test_backend_equals_dense_masked_attention_outputs_and_grads(mode, wrap, backend, flash_standin):
    for B, T, H, H_kv, g, sinks, lengths in CASES:
        if wrap and g is not None and g > T:
            continue
        lengths = None if lengths is None else torch.tensor(lengths)
        q, k, v = (t.requires_grad_() for t in inputs(B, T, H, H_kv))
        allowed = attention_pattern(mode, T, H, group_size=g, sink_tokens=sinks, wrap=wrap)
        q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
        expected = dense(q64, k64, v64, allowed, lengths)
        out = attention(q, k, v, mode, group_size=g, sink_tokens=sinks, wrap=wrap, lengths=lengths, backend=backend)
        assert out.shape == q.shape and out.dtype == q.dtype and out.is_contiguous()
        torch.testing.assert_close(out.double(), expected, **TOL)
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
        out.backward(grad_out)
        expected.backward(grad_out.double())
        for name, t, t64 in zip("qkv", (q, k, v), (q64, k64, v64)):
            torch.testing.assert_close(t.grad.double(), t64.grad, **TOL, msg=lambda m: f"grad of {name}: {m} "
                                       f"(B={B} T={T} H={H} H_kv={H_kv} g={g} sinks={sinks} lengths={lengths})")
    if backend == "flash":
        assert flash_standin, "the flash path did not call flash_attn_varlen_func"


def test_full_attention_equals_pytorch_causal_sdpa_including_T_1():
    for T in (1, 2, 9):
        q, k, v = inputs(2, T, 4, 2)
        expected = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2).repeat_interleave(2, 1),
                                                  v.transpose(1, 2).repeat_interleave(2, 1), is_causal=True)
        for backend in ("reference", "sdpa"):
            torch.testing.assert_close(attention(q, k, v, backend=backend), expected.transpose(1, 2), **TOL)


def test_bfloat16_sdpa_path_stays_close_to_float32():
    # the bench runs bf16; bf16 has ~3 significant digits, so the tolerance is loose on purpose
    q, k, v = inputs(1, 64, 4, 4)
    for mode in ("full", "s2", "sf"):
        exact = attention(q, k, v, mode, backend="reference")
        low = attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), mode, backend="sdpa")
        assert low.dtype == torch.bfloat16
        torch.testing.assert_close(low.float(), exact, rtol=0, atol=3e-2)


# ----------------------------------------------------------------------------- the patterns themselves

def pattern_from_the_rules(mode, T, H, g, sinks, wrap):
    """attention.py's rules (its docstring), one pair (i, j) at a time."""
    allowed = torch.zeros(H, T, T, dtype=torch.bool)
    for h in range(H):
        for i in range(T):
            for j in range(T):
                if mode == "full":
                    ok = j <= i
                elif h < H // 2:
                    ok = j <= i and i // g == j // g
                elif not wrap:
                    ok = j <= i and (i + g // 2) // g == (j + g // 2) // g
                else:  # rolled positions: token p sits at (p - g/2) mod T
                    ri, rj = (i - g // 2) % T, (j - g // 2) % T
                    ok = rj <= ri and ri // g == rj // g
                if mode == "sf" and j < sinks and j <= i:
                    ok = True
                allowed[h, i, j] = ok
    return allowed


@pytest.mark.parametrize("mode,wrap", MODES, ids=[f"{m}{'-wrap' if w else ''}" for m, w in MODES])
def test_pattern_follows_the_documented_rules_pair_by_pair(mode, wrap):
    for T, g, sinks, H in ((16, 8, 4, 4), (22, 6, 2, 4), (13, 4, 5, 4), (8, 8, 1, 4), (16, 8, 2, 3), (14, 4, 3, 5)):
        expected = pattern_from_the_rules(mode, T, H, g, sinks, wrap)
        assert torch.equal(attention_pattern(mode, T, H, group_size=g, sink_tokens=sinks, wrap=wrap), expected)


@pytest.mark.parametrize("H", [4, 5])
def test_s2_wrap_is_the_papers_algorithm_1(H):
    # LongLoRA's Algorithm 1 run literally: roll heads H//2 onwards (for an odd H one more than half, as LongLoRA's
    # code) by -g/2 along the sequence, cut into groups of g, causal attention inside each group, roll back
    B, T, D, g = 2, 32, 8, 8
    q, k, v = inputs(B, T, H, H)

    def shift(x, direction):  # (B, T, H, D)
        return torch.cat([x[:, :, : H // 2], x[:, :, H // 2:].roll(direction * g // 2, dims=1)], dim=2)

    qs, ks, vs = (shift(t, -1).view(B * T // g, g, H, D).transpose(1, 2) for t in (q, k, v))  # (B*T/g, H, g, D)
    out = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True).transpose(1, 2).reshape(B, T, H, D)
    paper = shift(out, +1)
    for backend in ("reference", "sdpa"):
        torch.testing.assert_close(attention(q, k, v, "s2", group_size=g, wrap=True, backend=backend), paper, **TOL)


def test_default_group_size_is_a_quarter_of_T_rounded_to_even():
    assert resolve_group_size("s2", 8192) == 2048
    assert resolve_group_size("sf", 100) == 24  # 100/4 = 25 is odd: half a group must be whole tokens
    assert resolve_group_size("full", 100) is None
    assert resolve_group_size("s2", 100, 10) == 10
    # the smallest T with a default group: T = 8 gives g = 2, and so does every T up to 15; T = 7 has none
    assert [resolve_group_size("s2", T) for T in (8, 15, 16)] == [2, 2, 4]
    with pytest.raises(ValueError, match="needs T >= 8"):
        resolve_group_size("s2", 7)


def test_sf_with_zero_sinks_is_s2_and_sinks_are_ignored_by_s2():
    q, k, v = inputs(2, 40, 4, 2)
    s2 = attention(q, k, v, "s2", group_size=8)
    torch.testing.assert_close(attention(q, k, v, "sf", group_size=8, sink_tokens=0), s2, rtol=0, atol=0)
    torch.testing.assert_close(attention(q, k, v, "s2", group_size=8, sink_tokens=7), s2, rtol=0, atol=0)


def test_docstring_picture_is_what_the_code_draws():
    picture = "\n".join("    " + line for line in draw_patterns(16, 8, 2).splitlines())
    assert picture in A.__doc__


def test_cli_draws_the_patterns_and_rejects_bad_input():
    draw = lambda *argv: subprocess.run([sys.executable, "attention.py", *argv], cwd=ROOT, capture_output=True, text=True)  # noqa: E731
    ok = draw("--T", "8", "--group-size", "4")
    lines = ok.stdout.splitlines()
    assert ok.returncode == 0 and len(lines) == 9  # a header and one row per query
    assert lines[1].split()[1:] == ["#.......", "#.......", "#.......", "#.....##", "#.......", "#......."]
    bad = draw("--T", "8", "--group-size", "5")
    assert bad.returncode == 2 and bad.stderr.startswith("error: group_size must be even")  # one line (cli.entry)
    assert bad.stderr.count("\n") == 1


# ----------------------------------------------------------------------------- properties

def changed_after(x, i, seed=5):
    """x with every position after i replaced by fresh random values."""
    y = x.clone()
    y[:, i + 1:] = torch.randn(y[:, i + 1:].shape, generator=torch.Generator().manual_seed(seed))
    return y


@pytest.mark.parametrize("backend", ["sdpa", "flash", "reference"])
@pytest.mark.parametrize("mode", ["full", "s2", "sf"])
def test_attention_never_sees_the_future(mode, backend, flash_standin):
    # changing the tokens after position i never changes the outputs at or before i
    q, k, v = inputs(2, 29, 4, 2)
    out = attention(q, k, v, mode, group_size=6, sink_tokens=2, backend=backend)
    for i in (0, 2, 3, 5, 11, 27):
        later = attention(changed_after(q, i), changed_after(k, i), changed_after(v, i), mode, group_size=6,
                          sink_tokens=2, backend=backend)
        torch.testing.assert_close(later[:, : i + 1], out[:, : i + 1], rtol=0, atol=1e-6)
        assert not torch.allclose(later[:, i + 1:], out[:, i + 1:])  # the change itself is visible


@pytest.mark.parametrize("mode", ["s2", "sf"])
def test_wrap_lets_the_first_half_group_of_the_shifted_heads_see_the_last_tokens(mode):
    # the documented leak of the paper's roll: only the last g/2 tokens change, and the first g/2
    # outputs of the shifted heads change with them; the plain heads stay causal
    B, T, H, g = 1, 24, 4, 8
    q, k, v = inputs(B, T, H, H)
    k2, v2 = changed_after(k, T - g // 2 - 1), changed_after(v, T - g // 2 - 1)
    for backend in ("reference", "sdpa"):
        before = attention(q, k, v, mode, group_size=g, wrap=True, backend=backend)
        after = attention(q, k2, v2, mode, group_size=g, wrap=True, backend=backend)
        changed = (after - before).abs().amax(dim=-1)[0] > 1e-4  # (T, H)
        assert changed[: g // 2, H // 2:].all(), "the first g/2 queries of the shifted heads see the future"
        assert not changed[: T - g // 2, : H // 2].any()
        assert not changed[g // 2: T - g // 2].any()


def test_sinks_are_visible_to_every_query_of_every_head():
    T, H, sinks = 40, 4, 4
    allowed = attention_pattern("sf", T, H, group_size=8, sink_tokens=sinks)
    i = torch.arange(T)[:, None]
    assert torch.equal(allowed[:, :, :sinks], (torch.arange(sinks)[None, :] <= i).expand(H, T, sinks))
    # functionally: a change of the value at position 0 reaches every output under sf, and under s2
    # only the first group (plain heads) and the first half-group (shifted heads)
    q, k, v = inputs(1, T, H, H)
    v2 = v.clone()
    v2[:, 0] += 1.0
    sf_change = (attention(q, k, v2, "sf", group_size=8) - attention(q, k, v, "sf", group_size=8)).abs().amax(-1)[0]
    s2_change = (attention(q, k, v2, "s2", group_size=8) - attention(q, k, v, "s2", group_size=8)).abs().amax(-1)[0]
    assert (sf_change > 1e-6).all()
    assert (s2_change[:8, :2] > 1e-6).all() and (s2_change[8:, :2] == 0).all()
    assert (s2_change[:4, 2:] > 1e-6).all() and (s2_change[4:, 2:] == 0).all()


@pytest.mark.parametrize("backend", ["sdpa", "flash", "reference"])
def test_padding_is_never_seen_and_padded_outputs_are_zero(backend, flash_standin):
    q, k, v = inputs(3, 26, 4, 2)
    lengths = torch.tensor([26, 9, 0])
    for mode, wrap in MODES:
        kw = dict(group_size=8, sink_tokens=3, wrap=wrap, lengths=lengths, backend=backend)
        out = attention(q, k, v, mode, **kw)
        noisy = [t.clone() for t in (k, v)]
        for t in noisy:
            for b, L in enumerate(lengths.tolist()):
                t[b, L:] = 100.0  # large garbage in every padded key and value
        again = attention(q, *noisy, mode, **kw)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(again, out, rtol=0, atol=1e-6)
        for b, L in enumerate(lengths.tolist()):
            assert (out[b, L:] == 0).all()


def test_flash_path_cuts_sequences_at_each_rows_length(flash_standin):
    # LongLoRA's flash path derives the boundaries from the padded shape; ours come from the lengths
    q, k, v = inputs(2, 8, 2, 2)
    attention(q, k, v, "full", lengths=torch.tensor([5, 3]), backend="flash")
    (qp, kp, vp, cu_q, cu_k, max_q, max_k), _ = flash_standin[-1]
    assert cu_q.tolist() == [0, 5, 8] and cu_k.tolist() == [0, 5, 8] and (max_q, max_k) == (5, 5)
    torch.testing.assert_close(qp, torch.cat([q[0, :5], q[1, :3]]), rtol=0, atol=0)
    # sf: every segment after the sinks gets the sinks prepended to its keys only
    flash_standin.clear()
    attention(q, k, v, "sf", group_size=4, sink_tokens=1, lengths=torch.tensor([8, 6]), backend="flash")
    (_, _, _, plain_q, plain_k, *_), _ = flash_standin[0]
    assert plain_q.diff().tolist() == [4, 4, 4, 2] and plain_k.diff().tolist() == [4, 5, 4, 3]
    (_, _, _, shifted_q, shifted_k, *_), _ = flash_standin[1]
    assert shifted_q.diff().tolist() == [2, 4, 2, 2, 4] and shifted_k.diff().tolist() == [2, 5, 3, 2, 5]


def test_auto_backend_is_sdpa_on_cpu():
    q, k, v = inputs(1, 16, 2, 2)
    assert not A._flash_runs_on(q.bfloat16())
    torch.testing.assert_close(attention(q, k, v, "s2"), attention(q, k, v, "s2", backend="sdpa"), rtol=0, atol=0)


def test_flash_runs_only_on_cuda_half_precision():
    # device and dtype are all _flash_runs_on reads: stand-ins with a CUDA device reach its logic without a GPU
    on = lambda device, dtype: A._flash_runs_on(types.SimpleNamespace(device=torch.device(device), dtype=dtype))
    assert on("cuda", torch.bfloat16) and on("cuda", torch.float16)
    assert not on("cuda", torch.float32) and not on("cpu", torch.bfloat16) and not on("meta", torch.float16)


@pytest.fixture
def fresh_flash_lookup():
    """flash_varlen looks flash-attn up once per process: forget it before and after the test."""
    A.flash_varlen.cache_clear()
    yield
    A.flash_varlen.cache_clear()


def fake_flash_attn(version, with_varlen=True, calls=None):
    """A module that looks like an installed flash_attn package of this version."""
    module = types.ModuleType("flash_attn")
    if version is not None:
        module.__version__ = version
    if with_varlen:
        def flash_attn_varlen_func(*args, **kwargs):
            calls.append(args)
            return flash_varlen_standin(*args, **kwargs)
        module.flash_attn_varlen_func = flash_attn_varlen_func
    return module


@pytest.mark.parametrize("installed,picked", [
    ("2.6.3", "flash"),
    ("2.1.0", "flash"),
    ("2.7.4.post1", "flash"),
    ("2.0.9", "sdpa"),  # causal mask aligned to the top left: wrong for prepended keys
    ("flash-attn-4", "sdpa"),  # only flash_attn.cute: no flash_attn_varlen_func
    ("not installed", "sdpa"),
])
def test_auto_picks_flash_only_for_flash_attn_2_1_or_later(installed, picked, monkeypatch, fresh_flash_lookup):
    calls = []
    if installed == "not installed":
        monkeypatch.setitem(sys.modules, "flash_attn", None)  # `import flash_attn` raises ImportError
    elif installed == "flash-attn-4":
        monkeypatch.setitem(sys.modules, "flash_attn", fake_flash_attn(None, with_varlen=False))
        monkeypatch.setitem(sys.modules, "flash_attn.cute", types.ModuleType("flash_attn.cute"))
    else:
        monkeypatch.setitem(sys.modules, "flash_attn", fake_flash_attn(installed, calls=calls))
    monkeypatch.setattr(A, "_flash_runs_on", lambda q: True)  # as if q were CUDA bf16
    q, k, v = inputs(1, 16, 2, 2)
    out = attention(q, k, v, "sf", group_size=8, sink_tokens=2)
    assert ("flash" if calls else "sdpa") == picked
    torch.testing.assert_close(out, attention(q, k, v, "sf", group_size=8, sink_tokens=2, backend="sdpa"), **TOL)


def test_forced_flash_on_cpu_or_fp32_or_old_flash_attn_is_a_clear_value_error(monkeypatch, fresh_flash_lookup):
    q, k, v = inputs(1, 16, 2, 2)
    for dtype in (torch.float32, torch.bfloat16):  # CPU tensors: refused before any flash-attn lookup
        with pytest.raises(ValueError, match="needs CUDA fp16/bf16 tensors, got torch.(float32|bfloat16) on cpu"):
            attention(q.to(dtype), k.to(dtype), v.to(dtype), "s2", backend="flash")
    monkeypatch.setattr(A, "_flash_runs_on", lambda q: True)
    monkeypatch.setitem(sys.modules, "flash_attn", fake_flash_attn("2.0.4", calls=[]))
    with pytest.raises(ValueError, match="flash-attn 2.0.4 is older than 2.1"):
        attention(q, k, v, "s2", backend="flash")


@pytest.mark.parametrize("mode,wrap", [("sf", False), ("s2", True), ("sf", True)])
def test_flash_needs_the_bottom_right_causal_mask_of_2_1(mode, wrap, monkeypatch):
    # why auto refuses flash-attn < 2.1: its top-left mask gives each group's queries the prepended keys
    # (sinks, or the wrapped tail) and cuts off as many of their own; the bottom-right mask is right
    q, k, v = inputs(2, 32, 4, 2)
    kw = dict(group_size=8, sink_tokens=4, wrap=wrap)
    ref = attention(q, k, v, mode, backend="reference", **kw)
    monkeypatch.setattr(A, "_flash_runs_on", lambda q: True)
    errors = {}
    for top_left in (False, True):
        varlen = functools.partial(flash_varlen_standin, top_left=top_left)
        monkeypatch.setattr(A, "flash_varlen", lambda: (varlen, None))
        errors[top_left] = (attention(q, k, v, mode, backend="flash", **kw) - ref).abs().max().item()
    assert errors[False] < 1e-5 and errors[True] > 0.1, errors


def test_flash_packing_is_built_once_per_forward_and_no_layer_waits_for_the_device(monkeypatch, flash_standin):
    # A 4-layer model, SFT-style padded rows, activation checkpointing: 4 layers x (forward + recompute) x 2
    # halves of the heads would build the packing 16 times; it must be built once per half, and no
    # layer may read a tensor back to the host (tolist/item/bool wait for the GPU). The model reads
    # the lengths once per forward.
    from model import Transformer, preset

    built, reads = [], []
    pack = A._pack
    monkeypatch.setattr(A, "_pack", lambda *args: built.append(args[1:3]) or pack(*args))
    A._packing.cache_clear()

    def counting(name):
        original = getattr(torch.Tensor, name)

        def read(self, *args):
            reads.append((name, os.path.basename(sys._getframe(1).f_code.co_filename)))
            return original(self, *args)
        return read

    torch.manual_seed(0)
    model = Transformer(preset("tiny", n_layers=4, attn="sf", group_size=8, sink_tokens=2)).train()
    model.lean = model.gradient_checkpointing = True  # as train.py trains
    tokens = torch.randint(0, 256, (2, 32))
    lengths = torch.tensor([32, 19])
    with monkeypatch.context() as patch:
        for name in ("tolist", "item", "__bool__"):
            patch.setattr(torch.Tensor, name, counting(name))
        model(tokens, lengths=lengths).sum().backward()
    ours = [r for r in reads if r[1] in ("attention.py", "model.py", "memory.py")]  # (not the stand-in's own reads)
    assert ours == [("tolist", "model.py")]
    assert built == [(32, (32, 19))] * 2  # (T, lengths) for the plain and the shifted half of the heads
    assert len(flash_standin) == 4 * 2 * 2  # the flash path did run: layers x (forward, recompute) x halves


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("kwargs,shape,message", [
    (dict(mode="s2", group_size=1), (1, 16, 4, 4), "group_size must be at least 2"),
    (dict(mode="s2", group_size=18, wrap=True), (1, 16, 4, 4), "larger than the sequence length"),
    (dict(mode="sf", group_size=5), (1, 16, 4, 4), "group_size must be even"),
    (dict(mode="s2"), (1, 6, 4, 4), "needs T >= 8"),
    (dict(mode="sparse"), (1, 16, 4, 4), "unknown attention mode 'sparse'"),
    (dict(backend="triton"), (1, 16, 4, 4), "unknown attention backend 'triton'"),
    (dict(mode="sf", sink_tokens=-1), (1, 16, 4, 4), "sink_tokens must be"),
    (dict(lengths=torch.tensor([17])), (1, 16, 4, 4), "lengths must be"),
    (dict(), (1, 16, 4, 3), "do not fit q"),
])
def test_bad_arguments_raise_one_clear_error(kwargs, shape, message):
    B, T, H, H_kv = shape
    q, k, v = inputs(B, T, H, H_kv)
    with pytest.raises(ValueError, match=message):
        attention(q, k, v, **kwargs)


def test_pattern_rejects_bad_group_sizes():
    for g, message in ((0, "at least 2"), (20, "larger than"), (3, "even")):
        with pytest.raises(ValueError, match=message):
            attention_pattern("s2", 16, 4, group_size=g, wrap=True)
