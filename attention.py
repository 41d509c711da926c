"""Attention for long-context fine-tuning: full, S²-Attn (LongLoRA) and SF-Attn (SinkLoRA).

(First working version: full attention via SDPA and the readable reference path for every mode.
The grouped SDPA and FlashAttention-2 paths follow.)
"""
import math

import torch
import torch.nn.functional as F

MODES = ("full", "s2", "sf")
BACKENDS = ("auto", "reference", "sdpa", "flash")


def resolve_group_size(mode, T, group_size):
    """The group size g used for a sequence of T tokens (None for "full")."""
    if mode == "full":
        return None
    if group_size is None:
        # LongLoRA's ratio: g = T/4, rounded down to an even number so that half a group is whole
        g = 2 * (T // 8)
        if g < 2:
            raise ValueError(f"mode {mode!r} with the default group size T//4 needs T >= 8, got T={T}; pass group_size")
        return g
    g = int(group_size)
    if g < 2:
        raise ValueError(f"group_size must be >= 2, got {g}")
    if g > T:
        raise ValueError(f"group_size {g} is larger than the sequence length T={T}")
    if g % 2:
        raise ValueError(f"group_size must be even for mode {mode!r} (half the heads shift by g/2), got {g}")
    return g


def attention_pattern(mode, T, H, *, group_size=None, sink_tokens=4, wrap=False):
    """(H, T, T) bool: True where query i may see key j. Causality is part of the pattern."""
    if mode not in MODES:
        raise ValueError(f"unknown attention mode {mode!r}; expected one of {', '.join(MODES)}")
    i = torch.arange(T)[:, None]  # (T, 1) query positions
    j = torch.arange(T)[None, :]  # (1, T) key positions
    causal = j <= i  # (T, T)
    if mode == "full":
        return causal.expand(H, T, T).clone()
    if H % 2:
        raise ValueError(f"mode {mode!r} splits the heads in two halves; the number of heads must be even, got {H}")
    g = resolve_group_size(mode, T, group_size)
    half = g // 2
    plain = (i // g == j // g) & causal  # heads 0 .. H/2-1
    if wrap:
        # the paper's roll: position p sits at (p - g/2) mod T, groups and causality are taken there
        ri, rj = (i - half) % T, (j - half) % T
        shifted = (ri // g == rj // g) & (rj <= ri)
    else:
        shifted = ((i + half) // g == (j + half) // g) & causal  # heads H/2 .. H-1
    if mode == "sf" and sink_tokens > 0:
        sinks = (j < sink_tokens) & causal
        plain, shifted = plain | sinks, shifted | sinks
    return torch.cat([plain.expand(H // 2, T, T), shifted.expand(H // 2, T, T)])  # (H, T, T)


def _check(q, k, v, mode, backend, lengths):
    if mode not in MODES:
        raise ValueError(f"unknown attention mode {mode!r}; expected one of {', '.join(MODES)}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    if q.dim() != 4 or k.shape != v.shape or k.dim() != 4:
        raise ValueError(f"expected q (B, T, H, D) and k, v (B, T, H_kv, D); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    B, T, H, D = q.shape
    if k.shape[0] != B or k.shape[1] != T or k.shape[3] != D or H % k.shape[2]:
        raise ValueError(f"k, v {tuple(k.shape)} do not fit q {tuple(q.shape)} (need same B, T, D and H % H_kv == 0)")
    if lengths is not None and (lengths.shape != (B,) or bool((lengths < 0).any()) or bool((lengths > T).any())):
        raise ValueError(f"lengths must be a (B,) tensor of values in [0, T={T}], got {lengths.tolist()}")


def _reference(q, k, v, pattern, lengths):
    B, T, H, D = q.shape
    rep = H // k.shape[2]
    k = k.repeat_interleave(rep, dim=2)  # (B, T, H, D)
    v = v.repeat_interleave(rep, dim=2)  # (B, T, H, D)
    scores = torch.einsum("bihd,bjhd->bhij", q.float(), k.float()) / math.sqrt(D)  # (B, H, T, T)
    allowed = pattern.to(q.device)[None]  # (1, H, T, T)
    if lengths is not None:
        valid = torch.arange(T, device=q.device)[None, :] < lengths.to(q.device)[:, None]  # (B, T)
        # padded queries may look anywhere (keeps their softmax finite); their output is zeroed below
        allowed = allowed & valid[:, None, None, :] | ~valid[:, None, :, None]  # (B, H, T, T)
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
    out = torch.einsum("bhij,bjhd->bihd", probs, v.float())  # (B, T, H, D)
    if lengths is not None:
        out = out * valid[:, :, None, None]
    return out.to(q.dtype)


def attention(q, k, v, mode="full", *, group_size=None, sink_tokens=4, wrap=False, lengths=None, backend="auto"):
    """q (B, T, H, D); k, v (B, T, H_kv, D). Returns (B, T, H, D) in the dtype of q."""
    _check(q, k, v, mode, backend, lengths)
    B, T, H, D = q.shape
    if backend == "reference" or mode != "full":
        pattern = attention_pattern(mode, T, H, group_size=group_size, sink_tokens=sink_tokens, wrap=wrap)
        return _reference(q, k, v, pattern, lengths)
    rep = H // k.shape[2]
    qt = q.transpose(1, 2)  # (B, H, T, D)
    kt = k.repeat_interleave(rep, dim=2).transpose(1, 2)  # (B, H, T, D)
    vt = v.repeat_interleave(rep, dim=2).transpose(1, 2)  # (B, H, T, D)
    out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True).transpose(1, 2)  # (B, T, H, D)
    if lengths is not None:
        valid = torch.arange(T, device=q.device)[None, :] < lengths.to(q.device)[:, None]  # (B, T)
        out = out * valid[:, :, None, None]
    return out
