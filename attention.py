"""Attention for long-context fine-tuning: full, S²-Attn (LongLoRA) and SF-Attn (SinkLoRA).

Attention over long sequences costs T². LongLoRA's idea: during training, let each query look only inside its own
group of g tokens (g = T/4 by default), which costs about a quarter of causal full attention, and shift the groups
of half of the heads by g/2 so that information still flows from group to group. SinkLoRA adds a few "sink" tokens
(the first tokens of the sequence) that every query sees, as the attention-sink observation suggests. Inference
uses ordinary full attention over the whole context.

Which keys each query sees, for T=16 tokens, g=8 and 2 sinks ('#' visible, '.' hidden; one row per
query i, one column per key j; h is the head; `python attention.py` draws this for any T and g):

       full              s2 h<H/2          s2 h>=H/2         s2 wrap h>=H/2    sf h<H/2          sf h>=H/2
     0 #...............  #...............  #...............  #...........####  #...............  #...............
     1 ##..............  ##..............  ##..............  ##..........####  ##..............  ##..............
     2 ###.............  ###.............  ###.............  ###.........####  ###.............  ###.............
     3 ####............  ####............  ####............  ####........####  ####............  ####............
     4 #####...........  #####...........  ....#...........  ....#...........  #####...........  ##..#...........
     5 ######..........  ######..........  ....##..........  ....##..........  ######..........  ##..##..........
     6 #######.........  #######.........  ....###.........  ....###.........  #######.........  ##..###.........
     7 ########........  ########........  ....####........  ....####........  ########........  ##..####........
     8 #########.......  ........#.......  ....#####.......  ....#####.......  ##......#.......  ##..#####.......
     9 ##########......  ........##......  ....######......  ....######......  ##......##......  ##..######......
    10 ###########.....  ........###.....  ....#######.....  ....#######.....  ##......###.....  ##..#######.....
    11 ############....  ........####....  ....########....  ....########....  ##......####....  ##..########....
    12 #############...  ........#####...  ............#...  ............#...  ##......#####...  ##..........#...
    13 ##############..  ........######..  ............##..  ............##..  ##......######..  ##..........##..
    14 ###############.  ........#######.  ............###.  ............###.  ##......#######.  ##..........###.
    15 ################  ........########  ............####  ............####  ##......########  ##..........####

The rules, for query i and key j (always j <= i, except in the wrap ablation):
  * full: every earlier key.
  * s2 (S²-Attn): heads 0..⌊H/2⌋-1 see their group, ⌊i/g⌋ = ⌊j/g⌋; heads ⌊H/2⌋..H-1 (one more for an odd H,
    as LongLoRA's non-flash path shifts them; its flash path needs an even H) see groups shifted by half a
    group, ⌊(i+g/2)/g⌋ = ⌊(j+g/2)/g⌋, so the first and the last half-group are segments of their own. This is
    what LongLoRA's FlashAttention-2 training path computes; nothing wraps around.
  * s2 with wrap=True: the paper's Algorithm 1 and LongLoRA's non-flash fallback (forward_noflashattn in
    llama_attn_replace.py), which roll the shifted heads by g/2 (torch.roll) before cutting groups. The
    last half-group and the first one then share a group and, causality being taken in the rolled order,
    the first g/2 queries of the shifted heads SEE THE LAST g/2 TOKENS OF THE SEQUENCE, i.e. the future
    (rows 0-3, keys 12-15 above). Kept only to reproduce the paper's ablation.
  * sf (SF-Attn, our reading of SinkLoRA, whose code does not include it): s2 without wrap, plus the first
    `sink_tokens` positions of the sequence visible to every query of every head (causally: a query at
    i < sink_tokens sees the sinks j <= i only). The shifted groups stay in their own positions.

The ablation of the SinkLoRA paper is two knobs: the mode chooses the sinks (s2: none, whatever
`sink_tokens` says; sf: `sink_tokens` of them) and `wrap` chooses the paper's roll for the shifted heads:

    s2 (paper, with roll)      attention(..., mode="s2", wrap=True)
    s2 without the roll        attention(..., mode="s2")                 (the default s2)
    s2 + sinks (with roll)     attention(..., mode="sf", wrap=True)
    sf                         attention(..., mode="sf")                 (sink_tokens=4 by default)
    and sf with sink_tokens=0 is exactly s2.

Group size: `group_size=None` means LongLoRA's ratio g = T/4, rounded down to an even number (half a
group must be a whole number of tokens), so it follows T; pass an int for a fixed g (it must be even,
g >= 2). If T is not a multiple of g the last group is shorter. A g larger than T makes the plain heads'
group the whole row and cuts the shifted heads at g/2 only: LongLoRA's SFT path with its fixed 8192 on shorter
batches (data.longlora_sft_group_size). With wrap, g <= T.

Padding: `lengths` (B,) gives the real tokens of each row (right padding). Keys at j >= lengths[b] are never
attended, outputs at padded queries are zeros (causality alone keeps real queries away, except with wrap).

Three implementations of the same function, all tested against the dense pattern:
  * "reference": the pattern as a (H, T, T) boolean mask, a matmul and a softmax in fp32. The
    specification; O(T²) memory, for tests and reading.
  * "sdpa": F.scaled_dot_product_attention on each group, with the groups folded into the batch
    dimension; every call is a plain causal attention (is_causal=True), so no mask is built and the
    fused kernel skips the blocks above the diagonal. A group that also sees earlier keys (the sinks,
    or the wrapped tail) gets them prepended to its keys, and as many placeholder queries prepended to
    its queries, whose outputs are dropped: then "causal" over the longer sequence is exactly "all the
    prepended keys plus the causal group".
  * "flash": FlashAttention-2's flash_attn_varlen_func on packed sequences, one sequence per (row,
    group), with separate query and key boundaries (cu_seqlens) when keys are prepended; its causal
    mask is aligned to the bottom right, which is what a group with prepended keys needs. Padding is
    handled by cutting each row at its length, so batches with padding and several rows are right.
backend="auto" picks flash for fp16/bf16 on CUDA with flash-attn >= 2.1 (flash_varlen), sdpa otherwise. Masks
and packed indices are built once per forward on the device and reused by every layer (_valid, _packing).

Usage:
    from attention import attention
    y = attention(q, k, v, mode="s2")                  # q (B, T, H, D), k, v (B, T, H_kv, D)
"""
import functools
import itertools
import math
import re
import sys

import torch
import torch.nn.functional as F


MODES = ("full", "s2", "sf")
BACKENDS = ("auto", "reference", "sdpa", "flash")


# ----------------------------------------------------------------------------- the specification

def resolve_group_size(mode, T, group_size=None, wrap=False):
    """The group size g used for T tokens: LongLoRA's T/4 (made even) when group_size is None."""
    if mode == "full":
        return None
    if group_size is None:
        g = 2 * (T // 8)  # T/4 rounded down to an even number
        if g < 2:
            raise ValueError(f"mode {mode!r} with the default group size T/4 needs T >= 8, got T={T}; pass group_size")
        return g
    g = int(group_size)
    if g < 2:
        raise ValueError(f"group_size must be at least 2, got {g}")
    if g > T and wrap:
        raise ValueError(f"group_size {g} is larger than the sequence length T={T} (with wrap)")
    if g % 2:
        raise ValueError(f"group_size must be even for mode {mode!r} (half of the heads shift by g/2), got {g}")
    return g


def attention_pattern(mode, T, H, *, group_size=None, sink_tokens=4, wrap=False):
    """(H, T, T) bool, True where query i may see key j. Causality is part of the pattern."""
    _check_mode(mode, sink_tokens)
    i = torch.arange(T)[:, None]  # (T, 1) query positions
    j = torch.arange(T)[None, :]  # (1, T) key positions
    causal = j <= i  # (T, T)
    if mode == "full":
        return causal.expand(H, T, T).clone()
    g = resolve_group_size(mode, T, group_size, wrap)
    half = g // 2
    plain = (i // g == j // g) & causal  # heads 0 .. H/2-1
    if wrap:
        # the paper's roll: token p sits at (p - g/2) mod T; groups AND causality are taken there
        ri, rj = (i - half) % T, (j - half) % T
        shifted = (ri // g == rj // g) & (rj <= ri)
    else:
        shifted = ((i + half) // g == (j + half) // g) & causal  # heads H//2 .. H-1
    if mode == "sf":
        sinks = (j < sink_tokens) & causal
        plain, shifted = plain | sinks, shifted | sinks
    return torch.cat([plain.expand(H // 2, T, T), shifted.expand(H - H // 2, T, T)])  # (H, T, T)


@functools.lru_cache(maxsize=32)
def _valid(T, lengths, device):
    """(B, T) bool on the device, True at the real tokens of each row; lengths a tuple of B ints.
    Built once per (T, lengths, device): every layer reuses it without a host->device copy."""
    return (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).to(device)


def _reference(q, k, v, pattern, lengths):
    """Dense masked attention in fp32: the readable definition the fast paths are tested against.
    lengths: None or a tuple of B ints."""
    B, T, H, D = q.shape
    rep = H // k.shape[2]
    k = k.repeat_interleave(rep, dim=2)  # (B, T, H, D): query head h uses kv head h // rep
    v = v.repeat_interleave(rep, dim=2)  # (B, T, H, D)
    dtype = torch.promote_types(q.dtype, torch.float32)  # softmax in fp32 (or fp64 if given fp64)
    scores = torch.einsum("bihd,bjhd->bhij", q.to(dtype), k.to(dtype)) / math.sqrt(D)  # (B, H, T, T)
    allowed = pattern.to(q.device)[None]  # (1, H, T, T)
    if lengths is not None:
        valid = _valid(T, lengths, q.device)  # (B, T)
        # padded queries may look anywhere (keeps their softmax finite); their output is zeroed below
        allowed = allowed & valid[:, None, None, :] | ~valid[:, None, :, None]  # (B, H, T, T)
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1)  # (B, H, T, T)
    out = torch.einsum("bhij,bjhd->bihd", probs, v.to(dtype))  # (B, T, H, D)
    if lengths is not None:
        out = out * valid[:, :, None, None]
    return out.to(q.dtype).contiguous()


# ----------------------------------------------------------------------------- segments

def _segments(T, g, shifted, wrap, sinks):
    """Cut the sequence into the causal segments of one half of the heads.

    Returns a list of (start, stop, prefix_start, prefix_stop), in position order: the queries in
    [start, stop) see the keys of [start, stop) causally, plus every key of [prefix_start, prefix_stop).
    The prefix is the sinks before the segment (sf), or, for the group that the paper's roll wraps
    around, the tail of the sequence that the roll puts in front of the first tokens.
    """
    half = g // 2 if shifted else 0
    segments = []
    if not (shifted and wrap):
        cuts = [0, *range(g - half, T, g), T]  # plain heads: 0, g, 2g, ...; shifted: 0, g/2, 3g/2, ...
        for a, e in zip(cuts[:-1], cuts[1:]):
            segments.append((a, e, 0, min(sinks, a)))
    else:
        for r in range(0, T, g):  # the groups in rolled order: rolled positions [r, r+g)
            m = min(g, T - r)
            a = (r + half) % T  # the original position of the group's first token
            if a + m <= T:
                segments.append((a, a + m, 0, min(sinks, a)))
            else:  # the group wraps: the tail [a, T) comes first, then the head [0, a+m-T) sees all of it
                segments.append((a, T, 0, min(sinks, a)))
                segments.insert(0, (0, a + m - T, a, T))
    return tuple(segments)


def _plan(mode, T, g, sink_tokens, wrap):
    """The segments of each half of the heads: (plain heads, shifted heads), tuples (cache keys of _packing)."""
    sinks = sink_tokens if mode == "sf" else 0
    return _segments(T, g, False, wrap, sinks), _segments(T, g, True, wrap, sinks)


# ----------------------------------------------------------------------------- sdpa backend

def _sdpa_full(q, k, v, lengths):
    B, T, H, D = q.shape
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D), (B, H_kv, T, D)
    out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=k.shape[2] != H)
    # a contiguous (B, T, H, D), the layout the output projection needs; every mode returns this. (The
    # fused CPU and CUDA kernels already lay their output out this way, so this copies nothing.)
    out = out.transpose(1, 2).contiguous()  # (B, T, H, D)
    if lengths is not None:
        out = out * _valid(T, lengths, q.device)[:, :, None, None]  # padded queries -> zeros
    return out


def _attend_segments(q, k, v, segments, L):
    """One row, one half of the heads: q (T, h, D), k, v (T, h_kv, D) -> (T, h, D).

    Consecutive segments of the same shape are folded into the batch dimension of one SDPA call:
    n segments of length m become a (n, h, m, D) view of q without any copy.
    """
    T, h, D = q.shape
    # cut at the row's length: queries at or after L get zeros, keys at or after L are never seen
    clipped = []
    for a, e, p0, p1 in segments:
        if a < L:
            clipped.append((a, min(e, L), p0, max(p0, min(p1, L))))
    # blocks of consecutive segments with the same query length m and prefix (p0, p1)
    blocks = []
    for a, e, p0, p1 in clipped:
        if blocks and blocks[-1]["stop"] == a and blocks[-1]["m"] == e - a and blocks[-1]["prefix"] == (p0, p1):
            blocks[-1]["stop"], blocks[-1]["n"] = e, blocks[-1]["n"] + 1
        else:
            blocks.append({"start": a, "stop": e, "m": e - a, "n": 1, "prefix": (p0, p1)})
    blocks.sort(key=lambda blk: blk["start"])  # the wrapped head segment may come last in rolled order
    # split (not slice) the row into the blocks, so that backward concatenates the gradients once
    sizes = [blk["stop"] - blk["start"] for blk in blocks]
    if sum(sizes) < T:
        sizes.append(T - sum(sizes))  # the padded tail
    # (a split or cat of a single piece would still copy, and the backward of a split is a cat)
    q_parts, k_parts, v_parts = ((t.split(sizes) if len(sizes) > 1 else (t,)) for t in (q, k, v))
    part_starts = [0, *itertools.accumulate(sizes)]

    def prefix_rows(parts, full, p0, p1):
        # rows [p0, p1), taken from the split part that holds them if there is one: the backward of a
        # slice allocates zeros the size of what was sliced, and a part is smaller than the whole row
        for part, start in zip(parts, part_starts):
            if start <= p0 and p1 <= start + part.shape[0]:
                return part[p0 - start:p1 - start]
        return full[p0:p1]

    outs = []
    for blk, qb, kb, vb in zip(blocks, q_parts, k_parts, v_parts):
        n, m, (p0, p1) = blk["n"], blk["m"], blk["prefix"]
        qs, ks, vs = (t.view(n, m, t.shape[1], D) for t in (qb, kb, vb))  # (n, m, h, D): n segments of m tokens
        P = p1 - p0
        if P:
            # prepend the P prefix keys to every segment, and P placeholder queries (zeros, outputs dropped):
            # plain causal attention over the P + m tokens then gives each real query all the prefix keys
            # plus the causal keys of its own segment, and the fused kernel still skips the upper blocks
            kp, vp = prefix_rows(k_parts, k, p0, p1), prefix_rows(v_parts, v, p0, p1)  # (P, h_kv, D)
            qs = torch.cat([qs.new_zeros(1, 1, 1, 1).expand(n, P, h, D), qs], dim=1)  # (n, P+m, h, D)
            ks = torch.cat([kp.expand(n, *kp.shape), ks], dim=1)  # (n, P+m, h_kv, D)
            vs = torch.cat([vp.expand(n, *vp.shape), vs], dim=1)  # (n, P+m, h_kv, D)
        qs, ks, vs = (t.transpose(1, 2) for t in (qs, ks, vs))  # (n, h, P+m, D): segments in the batch dimension
        o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=ks.shape[1] != h)
        outs.append(o[:, :, P:].transpose(1, 2).reshape(n * m, h, D))  # (n*m, h, D)
    if sum(sizes[: len(blocks)]) < T:
        outs.append(q.new_zeros(T - sum(sizes[: len(blocks)]), h, D))  # padded queries -> zeros
    return torch.cat(outs) if len(outs) > 1 else outs[0]  # (T, h, D)


def _halves(n):
    """Plain and shifted heads: n//2 and the rest (llama_attn_replace.py's shift() rolls heads num_heads//2:)."""
    return n // 2, n - n // 2


def _sdpa_grouped(q, k, v, plan, lengths):
    B, T, H, D = q.shape
    if k.shape[2] % 2:
        # the halves of the query heads must find their own kv heads; with an odd number of kv heads
        # (multi-query attention, say) one kv head serves both halves, so expand them to H heads
        k, v = k.repeat_interleave(H // k.shape[2], dim=2), v.repeat_interleave(H // k.shape[2], dim=2)
    Ls = [T] * B if lengths is None else lengths
    rows = []
    # one row at a time, each a view; (squeeze for a single row: its backward is a view too, unbind's a stack)
    unbind = (lambda t: t.unbind(0)) if B > 1 else (lambda t: (t.squeeze(0),))
    for qb, kb, vb, L in zip(unbind(q), unbind(k), unbind(v), Ls):  # (T, H, D), (T, H_kv, D)
        halves = [_attend_segments(qh, kh, vh, segments, L)
                  for qh, kh, vh, segments in zip(*(t.split(_halves(t.shape[1]), dim=1) for t in (qb, kb, vb)), plan)]
        rows.append(torch.cat(halves, dim=1))  # (T, H, D)
    return rows[0].unsqueeze(0) if B == 1 else torch.stack(rows)  # (B, T, H, D); stack would copy even one row


# ----------------------------------------------------------------------------- flash backend

@functools.cache
def flash_varlen():
    """(flash_attn_varlen_func, None) when a usable flash-attn is installed, else (None, why not). Looked up once.

    Usable means FlashAttention-2 at version 2.1 or later: before 2.1, when a sequence has more keys than
    queries its causal mask is aligned to the top left (query r sees keys c <= r), so a group with
    prepended sink or wrapped keys would silently attend to the wrong keys; from 2.1 on it is aligned to
    the bottom right (c <= r + len_k - len_q), what the prepended keys need. flash-attn 4's wheel installs
    only the package flash_attn.cute, without flash_attn_varlen_func: the import below fails for it.
    """
    try:
        import flash_attn
        from flash_attn import flash_attn_varlen_func
    except ImportError as e:
        return None, f"flash-attn 2 cannot be imported ({e})"
    version = getattr(flash_attn, "__version__", "")
    found = re.match(r"(\d+)\.(\d+)", version)
    if found is None or tuple(map(int, found.groups())) < (2, 1):
        return None, (f"flash-attn {version or '(no version)'} is older than 2.1, whose causal mask is aligned to "
                      "the top left: wrong for S2/SF groups with prepended keys")
    return flash_attn_varlen_func, None


def _flash_runs_on(q):
    """FlashAttention-2 runs on CUDA fp16/bf16 tensors only."""
    return q.device.type == "cuda" and q.dtype in (torch.float16, torch.bfloat16)


def _pack(segments, T, Ls, device):
    """Row indices into the flattened (B*T) tokens, and the cumulative boundaries, for every (row, segment).

    Each row is cut at its own length, so padding never enters a sequence and sequence b of the
    batch starts at b*T: the boundaries come from the real lengths, not from T. Built on the host,
    then copied to the device in one go; _packing keeps the result.
    """
    q_rows, k_rows, q_lens, k_lens = [], [], [], []
    for b, L in enumerate(Ls):
        for a, e, p0, p1 in segments:
            e, p1 = min(e, L), max(p0, min(p1, L))
            if a >= e:
                continue  # the whole segment is padding
            q_rows.append(torch.arange(b * T + a, b * T + e))
            k_rows += [torch.arange(b * T + p0, b * T + p1), q_rows[-1]]  # prefix keys, then the segment
            q_lens.append(e - a)
            k_lens.append(e - a + p1 - p0)
    q_rows, k_rows = torch.cat(q_rows), torch.cat(k_rows)
    cu_q = torch.tensor([0, *itertools.accumulate(q_lens)], dtype=torch.int32)  # (n_seq + 1,)
    cu_k = torch.tensor([0, *itertools.accumulate(k_lens)], dtype=torch.int32)  # (n_seq + 1,)
    # one host->device copy of the four index tensors together
    on_device = torch.cat([q_rows, k_rows, cu_q.long(), cu_k.long()]).to(device)
    q_rows, k_rows, cu_q, cu_k = on_device.split([len(q_rows), len(k_rows), len(cu_q), len(cu_k)])
    return q_rows, k_rows, cu_q.int(), cu_k.int(), max(q_lens), max(k_lens)


@functools.lru_cache(maxsize=32)
def _packing(segments, T, Ls, device):
    """_pack's result, kept on the device: the layers of a model (and their recomputation in backward)
    share one packing per half of the heads instead of rebuilding and copying it each time."""
    return _pack(segments, T, Ls, device)


def _flash(q, k, v, plan, lengths):
    B, T, H, D = q.shape
    Ls = (T,) * B if lengths is None else lengths
    if plan is None:  # full attention: one sequence per row, all heads together
        heads = [(q, k, v, ((0, T, 0, 0),))]
    else:
        if k.shape[2] % 2:  # see _sdpa_grouped
            k, v = k.repeat_interleave(H // k.shape[2], dim=2), v.repeat_interleave(H // k.shape[2], dim=2)
        heads = list(zip(*(t.split(_halves(t.shape[2]), dim=2) for t in (q, k, v)), plan))
    if sum(Ls) == 0:
        return q.new_zeros(B, T, H, D)
    varlen, why_not = flash_varlen()
    if varlen is None:
        raise ValueError(f"backend 'flash': {why_not}")
    outs = []
    for qh, kh, vh, segments in heads:  # (B, T, h, D), (B, T, h_kv, D)
        h, h_kv = qh.shape[2], kh.shape[2]
        q_rows, k_rows, cu_q, cu_k, max_q, max_k = _packing(segments, T, Ls, q.device)
        qp = qh.reshape(B * T, h, D)[q_rows]  # (total_q, h, D): the packed queries
        kp = kh.reshape(B * T, h_kv, D)[k_rows]  # (total_k, h_kv, D)
        vp = vh.reshape(B * T, h_kv, D)[k_rows]  # (total_k, h_kv, D)
        o = varlen(qp, kp, vp, cu_q, cu_k, max_q, max_k, dropout_p=0.0, softmax_scale=None, causal=True)
        # back to (B*T, h, D); padded query positions were never packed and stay zero
        outs.append(o.new_zeros(B * T, h, D).index_copy(0, q_rows, o).view(B, T, h, D))
    return torch.cat(outs, dim=2)  # (B, T, H, D)


# ----------------------------------------------------------------------------- the entry point

def _check_mode(mode, sink_tokens):
    if mode not in MODES:
        raise ValueError(f"unknown attention mode {mode!r}; expected one of {', '.join(MODES)}")
    if mode == "sf" and sink_tokens < 0:
        raise ValueError(f"sink_tokens must be a non-negative int, got {sink_tokens!r}")


def _check_inputs(q, k, v, lengths, backend):
    """(lengths as a tuple or None, the backend "auto" resolves to); a ValueError naming what does not fit."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape:
        raise ValueError(f"expected q (B, T, H, D) and k, v (B, T, H_kv, D), got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    B, T, H, D = q.shape
    if k.shape[0] != B or k.shape[1] != T or k.shape[3] != D or H % k.shape[2]:
        raise ValueError(f"k, v {tuple(k.shape)} do not fit q {tuple(q.shape)} (same B, T, D and H % H_kv == 0 needed)")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must have one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if lengths is not None:
        lengths = tuple(lengths.tolist() if torch.is_tensor(lengths) else lengths)  # the masks' and packings' cache key
        if len(lengths) != B or not all(isinstance(L, int) and 0 <= L <= T for L in lengths):
            raise ValueError(f"lengths must be B={B} ints in [0, T={T}], got {list(lengths)}")
    if backend == "auto":
        backend = "flash" if _flash_runs_on(q) and flash_varlen()[0] is not None else "sdpa"
    if backend == "flash" and not _flash_runs_on(q):
        raise ValueError(f"backend 'flash' needs CUDA fp16/bf16 tensors, got {q.dtype} on {q.device.type}; "
                         "use backend 'sdpa' or 'auto'")
    return lengths, backend


def attention(q, k, v, mode="full", *, group_size=None, sink_tokens=4, wrap=False, lengths=None, backend="auto"):
    """Causal attention with the pattern `mode`; see the module docstring for the patterns.

    q (B, T, H, D); k, v (B, T, H_kv, D) with H % H_kv == 0 (grouped-query attention: query head h uses
    kv head h // (H/H_kv)). Returns a contiguous (B, T, H, D) in the dtype of q.
      mode        "full" | "s2" | "sf"
      group_size  g, an even int >= 2 (<= T with wrap), or None for LongLoRA's T/4; ignored by "full"
      sink_tokens number of global sink tokens of "sf" (default 4); ignored by "full" and "s2"
      wrap        the paper's cyclic roll of the shifted heads (s2/sf ablation; leaks the future)
      lengths     None, or the real tokens per row (right padding) as a tuple of B ints or a LongTensor
                  (B,) (read once with .tolist(), which waits for the device: a model passes ints);
                  keys at j >= lengths[b] are never attended, outputs at padded queries are zeros
      backend     "auto" | "reference" | "sdpa" | "flash"
    """
    lengths, backend = _check_inputs(q, k, v, lengths, backend)  # lengths: None or a tuple of B ints
    B, T, H, D = q.shape
    _check_mode(mode, sink_tokens)
    g = resolve_group_size(mode, T, group_size, wrap)
    if backend == "reference":
        pattern = attention_pattern(mode, T, H, group_size=g, sink_tokens=sink_tokens, wrap=wrap)
        return _reference(q, k, v, pattern, lengths)
    plan = None if mode == "full" else _plan(mode, T, g, sink_tokens, wrap)
    if backend == "flash":
        return _flash(q, k, v, plan, lengths)
    if plan is None:
        return _sdpa_full(q, k, v, lengths)
    return _sdpa_grouped(q, k, v, plan, lengths)


if __name__ == "__main__":  # draw the patterns: the command line lives in longlora/draw.py
    from longlora.draw import main

    sys.exit(main())
