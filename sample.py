"""
Generate text from a LLaMA2 checkpoint (optionally + a LoRA adapter), with a full or a compressed KV cache.

    python sample.py --model out/llama-2-7b-longlora-32k --prompt paper.txt --max-new-tokens 256
    python sample.py --model /ckpt/llama-2-7b-hf --adapter out/adapter --chat --prompt "Summarise the paper."
    cat book.txt | python sample.py --model DIR --prompt - --kv-cache h2o --heavy 0.1 --recent 0.1
    python sample.py --model DIR --prompt book.txt --kv-cache sink --sink-tokens 4 --recent 2048
    python sample.py --prompt file.txt     # after `python demo.py`: the demo's best fine-tuned model

The model directory may hold a base model, a merged export (`lora.py merge`), or a base plus `--adapter`;
the RoPE scaling recorded in them is used. Text streams to stdout as it is generated; prefill and decode
speed go to stderr.

How generation works: the prompt is run through the model in chunks of `--prefill-chunk` tokens (so the
attention scores of a 100k-token prompt never exist all at once); every layer leaves its keys and values
in a KV cache; then each new token is one forward pass of a single position that attends to the cache.

Three caches, all with the `attend(layer_id, q, k, v, positions, rotate)` method model.py calls
(q, k, v arrive before RoPE; `rotate(x, positions)` applies it):

  full  model.KVCache. Keeps every token: same logits as one forward over the whole sequence.
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

`--heavy` and `--recent` take a size (an integer: 256) or a ratio of the prompt length (0.1). The cache
stores at most heavy + recent (h2o) or sink + recent (sink) tokens between forward passes; a chunk being
processed attends to those plus itself, causally (`--prefill-chunk 1` gives the strict token-by-token
policy). With a budget at least as long as the sequence both generate exactly the full cache's tokens;
the sink cache's logits are identical to the full cache's, H₂O's agree within rounding (it computes the
attention weights explicitly, for its scores; tests/test_sample.py checks both).
"""

import argparse
import json
import math
import os
import re
import sys
import time

import torch
import torch.nn.functional as F

from cli import Parser, UsageError, entry
from model import KVCache, Transformer


# ----------------------------------------------------------------------------------------------------
# KV caches that evict


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


def make_cache(model, kind, prompt_len, max_new_tokens, *, heavy=0.1, recent=0.1, sink_tokens=4, batch_size=1):
    """The KV cache for one generation: "full" (model.KVCache), "h2o" or "sink"."""
    p = next(model.parameters())
    if kind == "full":
        return KVCache(model.args, batch_size, prompt_len + max_new_tokens, device=p.device, dtype=p.dtype)
    if kind == "h2o":
        return H2OCache(model.args, resolve_size(heavy, prompt_len), resolve_size(recent, prompt_len))
    if kind == "sink":
        return SinkCache(model.args, sink_tokens, resolve_size(recent, prompt_len))
    raise ValueError(f"unknown kv cache {kind!r}; expected full, h2o or sink")


# ----------------------------------------------------------------------------------------------------
# Generation


def sample_next(logits: torch.Tensor, temperature=0.0, top_p=1.0, top_k=0, generator=None) -> int:
    """One token id from the logits (V,) of the last position. temperature 0 = greedy (argmax)."""
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # (V,)
    if top_k > 0:  # keep the k most likely tokens
        kth = probs.topk(min(top_k, probs.numel())).values[-1]
        probs = probs.masked_fill(probs < kth, 0.0)
    if top_p < 1.0:  # nucleus: the smallest set of tokens whose probability reaches top_p (Meta's rule)
        sorted_probs, order = probs.sort(descending=True)
        outside = sorted_probs.cumsum(0) - sorted_probs > top_p  # mass before this token already >= top_p
        probs = probs.scatter(0, order, sorted_probs.masked_fill(outside, 0.0))
    return int(torch.multinomial(probs / probs.sum(), 1, generator=generator))


@torch.inference_mode()  # on a generator function this applies around each step, not to the caller
def generate(model, prompt_ids, max_new_tokens, temperature=0.0, top_p=1.0, top_k=0, cache="full", *,
             heavy=0.1, recent=0.1, sink_tokens=4, prefill_chunk=512, eos_id=None, seed=None, stats=None):
    """Yield up to max_new_tokens token ids that continue prompt_ids (a list of ints); stop at eos_id.

    cache: "full", "h2o" (budget heavy + recent) or "sink" (budget sink_tokens + recent); heavy and
    recent are counts (int) or ratios of the prompt length (float). The prompt is prefilled in chunks
    of prefill_chunk tokens. stats, if a dict, receives prefill/decode token counts and seconds and
    the bytes the KV cache holds.
    """
    if len(prompt_ids) == 0:
        raise ValueError("the prompt is empty (generation needs at least one token, e.g. BOS)")
    if prefill_chunk < 1:
        raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
    device = next(model.parameters()).device
    ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=device)  # (1, T)
    kv = make_cache(model, cache, ids.shape[1], max_new_tokens, heavy=heavy, recent=recent, sink_tokens=sink_tokens)
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    stats = {} if stats is None else stats
    stats.update(prefill_tokens=ids.shape[1], prefill_seconds=0.0, decode_tokens=0, decode_seconds=0.0)

    t0 = time.perf_counter()
    for start in range(0, ids.shape[1], prefill_chunk):
        logits = model(ids[:, start:start + prefill_chunk], cache=kv)[0, -1]  # (V,) of the chunk's last position
    stats["kv_cache_bytes"] = cache_bytes(kv)
    for i in range(max_new_tokens):
        token = sample_next(logits, temperature, top_p, top_k, generator)  # int(): waits for the device
        elapsed = time.perf_counter() - t0
        stats["prefill_seconds" if i == 0 else "decode_seconds"] += elapsed
        if token == eos_id:
            return
        yield token
        if i + 1 == max_new_tokens:
            return  # no forward pass for logits nobody will read
        t0 = time.perf_counter()
        logits = model(torch.tensor([[token]], device=device), cache=kv)[0, -1]  # (V,)
        stats["decode_tokens"] += 1
        stats["kv_cache_bytes"] = cache_bytes(kv)


def stream_text(tokenizer, token_ids, context_ids=()):
    """Yield the text of token_ids piece by piece as the ids arrive (for printing while generating).

    Decoding one token at a time goes wrong twice: sentencepiece drops the leading space of the first
    piece ("▁The" -> "The"), and a character split over byte-fallback pieces (<0xE6><0x97><0xA5> = 日)
    decodes to U+FFFD until its last byte arrives. So decode everything generated so far, after one
    context token whose text is cut off again, hold back while the text ends in an incomplete
    character, and yield only the new suffix.
    """
    prefix = list(context_ids)[-1:]
    skip = len(tokenizer.decode(prefix))
    ids, printed = list(prefix), 0
    for t in token_ids:
        ids.append(t)
        text = tokenizer.decode(ids)[skip:]
        if text.endswith("\ufffd"):
            continue  # wait for the rest of a multi-byte character
        if len(text) > printed:
            yield text[printed:]
            printed = len(text)
    text = tokenizer.decode(ids)[skip:]
    if len(text) > printed:  # the stream ended inside a character: print what there is
        yield text[printed:]


def chat_prompt(tokenizer, text: str) -> list:
    """LLaMA2-chat's template for one user turn: BOS [INST] {text} [/INST]."""
    return tokenizer.encode(f"[INST] {text.strip()} [/INST]", bos=True)


# ----------------------------------------------------------------------------------------------------
# Loading and input checking (shared with eval.py)


def load_model(model_dir, adapter_dir=None, dtype=None, device=None) -> Transformer:
    """A base model, a merged export, or a base plus a LoRA adapter (lora.load_adapter applies the adapter's
    RoPE scaling and context). Raises CheckpointError / ValueError / FileNotFoundError with one line."""
    model = Transformer.from_pretrained(model_dir, dtype=dtype, device=device)
    if adapter_dir is not None:
        import lora  # only needed for adapters

        lora.load_adapter(model, adapter_dir)  # LoRA matrices stay fp32 next to bf16 weights, by design
    return model.eval()


def read_prompt(arg: str) -> str:
    """The prompt text from `-` (stdin), a file, or the argument itself. Raises ValueError/FileNotFoundError."""
    if arg == "-":
        data, where = sys.stdin.buffer.read(), "stdin"
    elif os.path.isdir(arg):
        raise ValueError(f"prompt {arg} is a directory, not a text file")
    elif os.path.isfile(arg):
        with open(arg, "rb") as f:
            data, where = f.read(), f"prompt file {arg}"
    elif re.fullmatch(r"\S*(/|\\)\S*|\S+\.[A-Za-z0-9]{1,8}", arg):  # one word with a slash or an extension
        raise FileNotFoundError(f"prompt file {arg}: no such file (to use it as text, add a space)")
    else:
        if not arg.strip():
            raise ValueError("the prompt is empty")
        return arg
    if b"\0" in data:
        raise ValueError(f"{where} looks binary (it contains NUL bytes), expected UTF-8 text")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{where} is not UTF-8 text (invalid byte 0x{data[e.start]:02x} at offset {e.start})") from None
    if not text.strip():
        raise ValueError(f"{where} is empty")
    return text


def size_or_ratio(s: str):
    """argparse type: "256" -> 256 tokens, "0.1" -> 10% of the prompt."""
    try:
        value = float(s) if any(c in s for c in ".eE") else int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a token count (256) or a ratio of the prompt (0.1), got {s!r}")
    if value < 0 or (isinstance(value, float) and value > 1):
        raise argparse.ArgumentTypeError(f"expected a count >= 0 or a ratio in [0, 1], got {s!r}")
    return value


def resolve_device_dtype(device, dtype):
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device} but CUDA is not available")
    if dtype in (None, "auto"):  # bf16 halves memory on GPUs; CPUs are fastest and exact in fp32
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    return device, getattr(torch, dtype)


# ----------------------------------------------------------------------------------------------------
# CLI


DEMO_RESULTS = os.path.join("out", "demo", "results.json")


def demo_model():
    """(base, adapter) of the best fine-tuned model of `python demo.py`, as its results.json names them: the model
    sample.py uses when no --model is given (as nanoGPT's sample.py reads out/)."""
    try:
        with open(DEMO_RESULTS) as f:
            best = json.load(f)["sample"]
        root = os.path.dirname(DEMO_RESULTS)
        # the adapter is null when the best model was fully fine-tuned (a whole model of its own)
        return os.path.join(root, best["base"]), best["adapter"] and os.path.join(root, best["adapter"])
    except (OSError, ValueError, KeyError, TypeError):
        raise UsageError(f"no --model given and no demo model in {DEMO_RESULTS}: pass --model DIR (a checkpoint), "
                         "or run `python demo.py` first") from None


def parse_args(argv):
    p = Parser(description="Generate text from a LLaMA2 checkpoint (+ LoRA adapter), streaming to stdout.", examples=[
        "python sample.py --model out/llama-2-7b-longlora-32k --prompt paper.txt --max-new-tokens 256",
        "python sample.py --model /ckpt/llama-2-7b-hf --adapter out/adapter --chat --prompt 'Summarise the paper.'",
        "cat book.txt | python sample.py --model DIR --prompt - --kv-cache h2o --heavy 0.1 --recent 0.1",
        "python sample.py --prompt file.txt    # after `python demo.py`: its best fine-tuned model"])
    p.add_argument("--model", help="checkpoint directory (Meta, HF or this project's layout; a merged export works). "
                   f"Default: after `python demo.py`, the demo's best fine-tuned model (base + adapter, from {DEMO_RESULTS})")
    p.add_argument("--adapter", help="LoRA adapter directory written by train.py (its RoPE scaling and context are applied)")
    p.add_argument("--prompt", required=True,
                   help="a text file, - for stdin, or the prompt itself (one word containing a slash or a file extension is taken as a path)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in LLaMA2-chat's template: <s>[INST] prompt [/INST]")
    p.add_argument("--max-new-tokens", type=int, default=256, help="stop after this many new tokens (or at EOS) (default 256)")
    p.add_argument("--temperature", type=float, default=0.6, help="sampling temperature; 0 = greedy (default 0.6, Meta's)")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling: sample from the smallest set of tokens holding this probability (default 0.9)")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens only; 0 = off (default)")
    p.add_argument("--seed", type=int, default=0, help="random seed for sampling (default 0)")
    p.add_argument("--kv-cache", default="full", choices=("full", "h2o", "sink"),
                   help="full: keep every token; h2o: heavy hitters + recent; sink: first tokens + recent window (default full)")
    p.add_argument("--heavy", type=size_or_ratio, default=0.1, help="h2o: heavy hitters kept, a count or a ratio of the prompt (default 0.1)")
    p.add_argument("--recent", type=size_or_ratio, default=0.1, help="h2o and sink: newest tokens kept, a count or a ratio of the prompt (default 0.1)")
    p.add_argument("--sink-tokens", type=int, default=4, help="sink: first tokens always kept (default 4, StreamingLLM's)")
    p.add_argument("--prefill-chunk", type=int, default=512, help="prompt tokens per forward pass while prefilling (bounds memory) (default 512)")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="weights and activations dtype; auto = bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    a = p.parse_args(argv)
    for flag in ("max_new_tokens", "prefill_chunk"):
        if getattr(a, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1")
    if not (0 <= a.temperature < math.inf and 0 < a.top_p <= 1) or a.top_k < 0 or a.sink_tokens < 0:  # (nan fails)
        p.error("need a finite --temperature >= 0, 0 < --top-p <= 1, --top-k >= 0, --sink-tokens >= 0")
    if a.kv_cache != "full" and a.recent == 0:  # the newest token must stay: it is the one attending
        p.error(f"--kv-cache {a.kv_cache} needs --recent > 0")
    return a


@entry
def main(argv=None) -> int:
    a = parse_args(argv)
    text = read_prompt(a.prompt)
    if a.model is None:
        if a.adapter:
            raise UsageError("--adapter needs --model, the base model it was trained on")
        a.model, a.adapter = demo_model()
        print(f"note: sampling from the demo's best model: --model {a.model} --adapter {a.adapter}", file=sys.stderr)
    device, dtype = resolve_device_dtype(a.device, a.dtype)
    model = load_model(a.model, a.adapter, dtype=dtype, device=device)
    tok = model.tokenizer
    if tok is None:
        raise ValueError(f"{a.model}: no tokenizer.model next to the weights (or in the folder above)")
    ids = chat_prompt(tok, text) if a.chat else tok.encode(text, bos=True)
    limit = model.args.max_seq_len
    max_new = a.max_new_tokens
    if a.kv_cache == "sink":  # positions restart in the cache: only the cache must fit the context
        budget = a.sink_tokens + resolve_size(a.recent, len(ids))
        if budget + min(a.prefill_chunk, len(ids)) > limit:
            raise ValueError(f"sink cache of {budget} tokens + prefill chunk {a.prefill_chunk} exceeds the model's "
                             f"context of {limit} tokens (max_seq_len); lower --recent or --prefill-chunk")
    else:  # full and h2o keep absolute positions, which must stay within the context
        if len(ids) > limit:
            raise ValueError(f"the prompt has {len(ids)} tokens, more than the model's context of {limit} "
                             f"(max_seq_len); shorten it or use --kv-cache sink")
        if len(ids) + max_new > limit:
            max_new = limit - len(ids)
            print(f"note: generating at most {max_new} tokens, where the model's context of {limit} ends", file=sys.stderr)

    stats = {}
    tokens = generate(model, ids, max_new, a.temperature, a.top_p, a.top_k, a.kv_cache, heavy=a.heavy,
                      recent=a.recent, sink_tokens=a.sink_tokens, prefill_chunk=a.prefill_chunk,
                      eos_id=tok.eos_id, seed=a.seed, stats=stats)
    try:
        for piece in stream_text(tok, tokens, context_ids=ids):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()
    except BrokenPipeError:  # the reader went away (`| head`): stop quietly, as other Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    rate = lambda n, s: f"{n / s:.1f} tok/s" if s > 0 else "n/a"
    print(f"prefill: {stats['prefill_tokens']} tokens in {stats['prefill_seconds']:.2f}s "
          f"({rate(stats['prefill_tokens'], stats['prefill_seconds'])}); decode: {stats['decode_tokens']} tokens in "
          f"{stats['decode_seconds']:.2f}s ({rate(stats['decode_tokens'], stats['decode_seconds'])}); "
          f"kv cache: {a.kv_cache}, {stats['kv_cache_bytes'] / 2**20:.1f} MiB", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
