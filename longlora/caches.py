"""
KV caches that evict, for sample.py: H₂O and attention sinks. Each has the `attend(layer_id, q, k, v, positions,
rotate)` method model.py calls for a forward with a cache (q, k, v arrive before RoPE; `rotate(x, positions)`
applies it), as model.KVCache, which keeps every token.

  h2o   Heavy-Hitter Oracle (Zhang et al., 2023), the KV compression SinkLoRA uses at inference.
        Per layer and per KV head, add up the attention each cached token receives; keep the `--heavy`
        highest-scoring tokens plus the `--recent` newest, evict the rest:

            cached:  t0  t1  t2  t3  t4  t5  t6  t7  t8  t9      heavy=2, recent=3
            score:   9.1 0.3 2.0 0.2 4.2 0.1 0.4 .   .   .
            kept:    t0          t4              t7  t8  t9      (each KV head chooses its own)

        Keys are cached after RoPE: a token keeps its absolute position forever.
  sink  StreamingLLM (Xiao et al., 2023): keep the first `--sink-tokens` tokens (the "attention sinks"
        that soak up attention mass) plus a window of the `--recent` newest:

            cached:  t0 t1 t2 t3 | t4 ... t90 | t91 ... t99      sink=4, recent=9
            kept:    t0 t1 t2 t3                t91 ... t99
            rotated: 0  1  2  3                 4   ... 12       (positions in the cache)

        Keys are cached BEFORE RoPE and rotated by their index in the cache at every step; the new
        queries by theirs. That is StreamingLLM's rule: positions never exceed the cache size, so the
        stream can run past the context the model was trained for. (Rotating by the original positions
        would leave a gap between t3 and t91 the model never saw in training.)

"""

import math

import torch
import torch.nn.functional as F


def h2o_keep(score: torch.Tensor, kept: torch.Tensor, heavy: int, recent: int) -> torch.Tensor:
    """Which cached entries H₂O keeps: indices (..., heavy + recent), ascending.

    score (..., S): attention each entry has accumulated; kept (..., S): its absolute position (entries may
    be in any order). The `recent` newest entries are always kept; among the others, the `heavy`
    highest-scoring ("heavy hitters") are. With S <= heavy + recent everything is kept.
    """
    S = score.shape[-1]
    if S <= heavy + recent:
        return torch.arange(S, device=score.device).expand(score.shape)
    newest = kept.topk(recent, dim=-1).indices  # (..., recent)
    contenders = score.scatter(-1, newest, float("-inf"))  # the recent window does not compete
    heavy_idx = contenders.topk(heavy, dim=-1).indices  # (..., heavy)
    return torch.cat([heavy_idx, newest], dim=-1).sort(dim=-1).values  # (..., heavy + recent)


class H2OCache:
    """Heavy-Hitter Oracle KV cache. Per layer it holds, for each batch row b and KV head g, S <= budget entries:

        k, v   (B, H_kv, S, D)  keys after RoPE at their absolute positions, and values
        score  (B, H_kv, S)     fp32 attention each token has received so far, summed over the queries
                                and over the query heads that share KV head g (GQA)
        kept   (B, H_kv, S)     absolute position of each entry

    Each KV head evicts different tokens but always keeps the same number, so one dense tensor per layer
    holds them all. Attention does not care about the order of the keys, so the entries are in no
    particular order: `kept` says which token each one is.

    Two paths, one policy. A chunk of new tokens (prefill) goes the readable way: append, attend, then
    keep h2o_keep()'s choice. Once the cache is full, each decoding step adds one token and evicts one,
    so `decode_step` does that in place: it overwrites the evicted entry (the lowest score outside the
    recent window) with the new token instead of copying the whole cache twice (append + select), which
    would cost as much memory traffic as the full cache H₂O is meant to save. Tests check both agree.
    """

    def __init__(self, args, heavy: int, recent: int):
        if heavy < 0 or recent < 1:
            raise ValueError(f"h2o needs heavy >= 0 and recent >= 1 (got heavy={heavy}, recent={recent})")
        self.heavy, self.recent, self.budget = heavy, recent, heavy + recent
        self.k, self.v, self.score, self.kept = ([None] * args.n_layers for _ in range(4))
        self.pos = 0  # tokens seen so far; advanced by Transformer.forward
        self.in_place = True  # tests switch the in-place decoding step off to compare it with the readable path

    def attend(self, layer_id, q, k, v, positions, rotate):
        B, T, H, D = q.shape
        H_kv = k.shape[2]
        q, k = rotate(q, positions), rotate(k, positions)  # absolute positions: H₂O never moves a token
        positions = positions.to(k.device)  # the bookkeeping beside this layer's keys (a split model: longlora/devices.py)
        k, v = k.transpose(1, 2), v.transpose(1, 2)  # (B, H_kv, T, D)
        # Query head h uses KV head h // n_rep, so view the H query heads as (H_kv, n_rep).
        qg = q.transpose(1, 2).reshape(B, H_kv, H // H_kv, T, D)  # (B, H_kv, n_rep, T, D)
        if T == 1 and self.in_place and self.k[layer_id] is not None and self.k[layer_id].shape[2] == self.budget:
            y = self.decode_step(layer_id, qg, k, v, positions)  # (B, H_kv, n_rep, 1, D)
        else:
            y = self.append_and_evict(layer_id, qg, k, v, positions)  # (B, H_kv, n_rep, T, D)
        return y.reshape(B, H, T, D).transpose(1, 2).to(q.dtype)  # (B, T, H, D)

    def append_and_evict(self, layer_id, qg, k, v, positions):
        """The readable path, for any number T of new tokens: append them, attend, keep h2o_keep's choice."""
        B, H_kv, n_rep, T, D = qg.shape
        new = (k.contiguous(), v.contiguous(),  # contiguous: decode_step writes into them later
               torch.zeros(B, H_kv, T, device=k.device),  # a new token has received no attention yet
               positions.expand(B, H_kv, T).clone())
        if self.k[layer_id] is None:
            keys, values, score, kept = new
        else:
            old = (self.k[layer_id], self.v[layer_id], self.score[layer_id], self.kept[layer_id])
            keys, values, score, kept = (torch.cat([o, n], dim=2) for o, n in zip(old, new))
        S = keys.shape[2]  # cached + new
        # We need the attention weights themselves, which SDPA does not return: compute them explicitly, in
        # the cache's dtype (an fp32 copy of the whole cache would cost as much traffic as the full cache
        # H₂O saves), and upcast only the scores (B, H_kv, n_rep, T, S) for the softmax and the tally.
        att = torch.einsum("bgrtd,bgsd->bgrts", qg, keys).float() / math.sqrt(D)  # (B, H_kv, n_rep, T, S)
        # every cached token is in the past of every new query; the new tokens are causal among themselves
        visible = torch.ones(T, S, dtype=torch.bool, device=qg.device).tril(diagonal=S - T)  # (T, S)
        att = att.masked_fill(~visible, float("-inf")).softmax(dim=-1)
        y = torch.einsum("bgrts,bgsd->bgrtd", att.to(values.dtype), values)  # (B, H_kv, n_rep, T, D)
        score = score + att.sum(dim=(2, 3))  # (B, H_kv, S): summed over the group's heads and the queries
        if S > self.budget:
            idx = h2o_keep(score, kept, self.heavy, self.recent)  # (B, H_kv, budget)
            keys = keys.gather(2, idx[..., None].expand(-1, -1, -1, D))
            values = values.gather(2, idx[..., None].expand(-1, -1, -1, D))
            score, kept = score.gather(2, idx), kept.gather(2, idx)
        self.k[layer_id], self.v[layer_id], self.score[layer_id], self.kept[layer_id] = keys, values, score, kept
        return y

    def decode_step(self, layer_id, qg, k, v, positions):
        """One new token into a full cache: attend to the cache plus itself, then write it over the entry
        with the lowest score outside the recent window. k, v (B, H_kv, 1, D)."""
        keys, values, score, kept = self.k[layer_id], self.v[layer_id], self.score[layer_id], self.kept[layer_id]
        D = qg.shape[-1]
        # scores against the cache and against the new token itself, in the cache's dtype (see
        # append_and_evict); softmax over both together in fp32
        att_cache = torch.einsum("bgrtd,bgsd->bgrts", qg, keys)  # (B, H_kv, n_rep, 1, S)
        att_self = (qg * k[:, :, None]).sum(-1, keepdim=True)  # (B, H_kv, n_rep, 1, 1)
        att = (torch.cat([att_cache, att_self], dim=-1).float() / math.sqrt(D)).softmax(dim=-1)  # (B, H_kv, n_rep, 1, S+1)
        p = att.to(values.dtype)
        y = torch.einsum("bgrts,bgsd->bgrtd", p[..., :-1], values) + p[..., -1:] * v[:, :, None]  # (B, H_kv, n_rep, 1, D)
        received = att.sum(dim=(2, 3))  # (B, H_kv, S+1)
        score += received[..., :-1]
        # The recent window is the `recent` newest tokens, the new one included: positions > pos - recent.
        outside = kept <= positions[0] - self.recent  # (B, H_kv, S)
        victim = score.masked_fill(~outside, float("inf")).argmin(dim=-1, keepdim=True)  # (B, H_kv, 1)
        keys.scatter_(2, victim[..., None].expand(-1, -1, -1, D), k)
        values.scatter_(2, victim[..., None].expand(-1, -1, -1, D), v)
        score.scatter_(2, victim, received[..., -1:])
        kept.scatter_(2, victim, positions.expand_as(victim))
        return y


class SinkCache:
    """StreamingLLM's KV cache: the first `sink_tokens` tokens plus the `recent` newest. Per layer:

        k, v   (B, S, H_kv, D)  keys BEFORE RoPE (they are re-rotated by cache index at each step), values
        kept   (S,)             absolute position of each entry (bookkeeping; tests read it)
    """

    def __init__(self, args, sink_tokens: int, recent: int):
        if sink_tokens < 0 or recent < 1:
            raise ValueError(f"sink cache needs sink_tokens >= 0 and recent >= 1 (got {sink_tokens}, {recent})")
        self.sink_tokens, self.recent, self.budget = sink_tokens, recent, sink_tokens + recent
        self.k, self.v, self.kept = ([None] * args.n_layers for _ in range(3))
        self.pos = 0

    def attend(self, layer_id, q, k, v, positions, rotate):
        B, T, H, D = q.shape
        positions = positions.to(k.device)  # the bookkeeping beside this layer's keys (a split model: longlora/devices.py)
        if self.k[layer_id] is None:
            keys, values, kept = k, v, positions
        else:
            keys = torch.cat([self.k[layer_id], k], dim=1)  # (B, S, H_kv, D), S = cached + new
            values = torch.cat([self.v[layer_id], v], dim=1)
            kept = torch.cat([self.kept[layer_id], positions])
        S = keys.shape[1]
        # StreamingLLM's position rule: rotate by the index in the cache, not by the original position
        in_cache = torch.arange(S, device=q.device)
        qr, kr = rotate(q, in_cache[S - T:]), rotate(keys, in_cache)
        visible = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=S - T)  # (T, S)
        # enable_gqa: query head h uses key/value head h // (H / H_kv), without copying the cache
        y = F.scaled_dot_product_attention(qr.transpose(1, 2), kr.transpose(1, 2), values.transpose(1, 2),
                                           attn_mask=visible, enable_gqa=H != keys.shape[2])  # (B, H, T, D)
        if S > self.budget:
            idx = torch.cat([in_cache[:self.sink_tokens], in_cache[S - self.recent:]])  # (budget,)
            keys, values, kept = keys[:, idx], values[:, idx], kept[idx]
        self.k[layer_id], self.v[layer_id], self.kept[layer_id] = keys, values, kept
        return y.transpose(1, 2)  # (B, T, H, D)


def resolve_size(value, prompt_len: int) -> int:
    """A cache size given as a count (int) or as a ratio of the prompt length (float)."""
    if isinstance(value, float):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"a ratio must be in [0, 1], got {value}")
        return max(1, round(value * prompt_len)) if value > 0 else 0
    return int(value)


def cache_bytes(cache) -> int:
    """Memory held by a KV cache: its keys, values and bookkeeping (every list of per-layer tensors)."""
    return sum(t.numel() * t.element_size() for field in vars(cache).values() if isinstance(field, list)
               for t in field if t is not None)
