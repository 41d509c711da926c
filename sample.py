"""
Generate text from a LLaMA2 checkpoint (optionally + a LoRA adapter), with a full or a compressed KV cache.

    python sample.py --model out/llama-2-7b-longlora-32k --prompt paper.txt --max-new-tokens 256
    python sample.py --model /ckpt/llama-2-7b-hf --adapter out/adapter --chat --prompt "Summarise the paper."
    cat book.txt | python sample.py --model DIR --prompt - --kv-cache h2o --heavy 0.1 --recent 0.1
    python sample.py --model DIR --prompt book.txt --kv-cache sink --sink-tokens 4 --recent 2048
    python sample.py --prompt file.txt     # after `python demo.py`: the demo's best fine-tuned model
    python sample.py --model /ckpt/llama-2-70b --devices cuda:0,cuda:1 --prompt paper.txt   # layers split over 2 GPUs

The model directory may hold a base model, a merged export (`lora.py merge`), or a base plus `--adapter`;
the RoPE scaling recorded in them is used. Text streams to stdout as it is generated; prefill and decode
speed go to stderr.

How generation works: the prompt is run through the model in chunks of `--prefill-chunk` tokens (so the
attention scores of a 100k-token prompt never exist all at once); every layer leaves its keys and values
in a KV cache; then each new token is one forward pass of a single position that attends to the cache.

Three KV caches, one interface (`attend(layer_id, q, k, v, positions, rotate)`, which model.py calls):
  full  model.KVCache: every token; the same logits as one forward over the whole sequence.
  h2o   Heavy-Hitter Oracle (Zhang et al., 2023), the KV compression SinkLoRA uses at inference: the `--heavy`
        tokens that received the most attention plus the `--recent` newest (longlora/caches.py).
  sink  StreamingLLM (Xiao et al., 2023): the first `--sink-tokens` tokens plus the `--recent` newest, rotated
        by their place in the cache, so a stream can run past the trained context (longlora/caches.py).

`--heavy` and `--recent` take a size (256) or a ratio of the prompt (0.1). Between passes the cache holds at most
heavy + recent (h2o) or sink + recent (sink) tokens; a chunk attends to those plus itself, causally. With a budget
as long as the sequence both give the full cache's tokens (tests/test_sample.py).
"""

import os
import sys
import time

import torch

from longlora.adapter import DEMO_RESULTS, demo_model, load_model
from longlora.caches import H2OCache, SinkCache, cache_bytes, resolve_size
from longlora.cli import (MAX_CTX, Parser, UsageError, device_list, entry, integer, number, read_prompt, resolve_device_dtype,
                          size_or_ratio)
from model import KVCache


# ----------------------------------------------------------------------------------------------------
# KV caches


def make_cache(model, kind, prompt_len, max_new_tokens, *, heavy=0.1, recent=0.1, sink_tokens=4, batch_size=1):
    """The KV cache for one generation: "full" (model.KVCache), "h2o" or "sink"."""
    if kind == "full":  # each layer's keys and values on the device of its weights (several: longlora/devices.py)
        devices = [layer.attention_norm.weight.device for layer in model.layers]
        return KVCache(model.args, batch_size, prompt_len + max_new_tokens, device=devices, dtype=next(model.parameters()).dtype)
    if kind == "h2o":
        return H2OCache(model.args, resolve_size(heavy, prompt_len), resolve_size(recent, prompt_len))
    if kind == "sink":
        return SinkCache(model.args, sink_tokens, resolve_size(recent, prompt_len))
    raise ValueError(f"unknown kv cache {kind!r}; expected full, h2o or sink")


# ----------------------------------------------------------------------------------------------------
# Generation


def sample_next(logits: torch.Tensor, temperature=0.0, top_p=1.0, top_k=0, generator=None) -> int:
    """One token id from the logits (V,) of the last position. temperature 0 = greedy (argmax).

    softmax(logits / T) is computed in float64 from logits - max(logits): every scaled value is <= 0, so no
    temperature, however small (1e-300), overflows; as T -> 0 it tends to greedy (ties shared)."""
    if temperature <= 0:
        return int(logits.argmax())
    z = logits.double()
    probs = torch.softmax((z - z.max()) / temperature, dim=-1).float()  # (V,)
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
             heavy=0.1, recent=0.1, sink_tokens=4, prefill_chunk=512, eos_ids=(), seed=None, stats=None):
    """Yield up to max_new_tokens token ids that continue prompt_ids (a list of ints); stop at any of eos_ids.

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
    stats = {} if stats is None else stats
    stats.update(prefill_tokens=ids.shape[1], prefill_seconds=0.0, decode_tokens=0, decode_seconds=0.0)

    t0 = time.perf_counter()
    for start in range(0, ids.shape[1], prefill_chunk):
        logits = model(ids[:, start:start + prefill_chunk], cache=kv)[0, -1]  # (V,) of the chunk's last position
    stats["kv_cache_bytes"] = cache_bytes(kv)
    generator = torch.Generator(device=logits.device).manual_seed(seed) if seed is not None else None  # the last stage's
    for i in range(max_new_tokens):
        token = sample_next(logits, temperature, top_p, top_k, generator)  # int(): waits for the device
        elapsed = time.perf_counter() - t0
        stats["prefill_seconds" if i == 0 else "decode_seconds"] += elapsed
        if token in eos_ids:
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
    piece ("▁The" -> "The"), and a character split over byte-fallback pieces (<0xE6><0x97><0xA5> = 日), or
    over byte-level BPE tokens (🙂 in two), decodes to U+FFFD until its last byte arrives. So decode everything generated so far, after one
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
    """One user turn in the model's own chat template (rendered as transformers does: longlora/tokenizer.py),
    up to the start of the assistant's answer; without a template, LLaMA2-chat's: BOS [INST] {text} [/INST]."""
    if tokenizer.chat_template is not None:
        return tokenizer.apply_chat_template([{"role": "user", "content": text.strip()}], add_generation_prompt=True)
    return tokenizer.encode(f"[INST] {text.strip()} [/INST]", bos=True)


# ----------------------------------------------------------------------------------------------------
# CLI


def parse_args(argv):
    p = Parser(description="Generate text from a LLaMA2 checkpoint (+ LoRA adapter), streaming to stdout.", examples=[
        "python sample.py --model out/llama-2-7b-longlora-32k --prompt paper.txt --max-new-tokens 256",
        "python sample.py --model /ckpt/llama-2-7b-hf --adapter out/adapter --chat --prompt 'Summarise the paper.'",
        "cat book.txt | python sample.py --model DIR --prompt - --kv-cache h2o --heavy 0.1 --recent 0.1"])
    p.add_argument("--model", help="checkpoint directory (Meta, HF or this project's layout; a merged export works). "
                   f"Default: after `python demo.py`, the demo's best fine-tuned model (base + adapter, from {DEMO_RESULTS})")
    p.add_argument("--adapter", help="LoRA adapter directory written by train.py (its RoPE scaling and context are applied)")
    p.add_argument("--rope-scaling", type=number(1), help="linear RoPE factor for a model whose config states none "
                   "(LongAlpaca's fully fine-tuned models); refused where it states another")
    p.add_argument("--prompt", required=True,
                   help="a text file, - for stdin, or the prompt itself (one word containing a slash or a file extension is taken as a path)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template (tokenizer_config.json's "
                   "or chat_template.jinja), or LLaMA2-chat's <s>[INST] prompt [/INST] for a model without one")
    p.add_argument("--max-new-tokens", type=integer(1, MAX_CTX), default=256, help="stop after this many new tokens (or at EOS) (default 256)")
    p.add_argument("--temperature", type=number(0), default=0.6, help="sampling temperature; 0 = greedy, and a tiny one tends to greedy (default 0.6, Meta's)")
    p.add_argument("--top-p", type=number(0, 1, lo_open=True), default=0.9, help="nucleus sampling: sample from the smallest set of tokens holding this probability (default 0.9)")
    p.add_argument("--top-k", type=integer(0), default=0, help="sample from the k most likely tokens only; 0 = off (default)")
    p.add_argument("--seed", type=integer(0, 2**63 - 1), default=0, help="random seed for sampling (default 0)")
    p.add_argument("--kv-cache", default="full", choices=("full", "h2o", "sink"),
                   help="full: keep every token; h2o: heavy hitters + recent; sink: first tokens + recent window (default full)")
    p.add_argument("--heavy", type=size_or_ratio, default=0.1, help="h2o: heavy hitters kept, a count or a ratio of the prompt (default 0.1)")
    p.add_argument("--recent", type=size_or_ratio, default=0.1, help="h2o and sink: newest tokens kept, a count or a ratio of the prompt (default 0.1)")
    p.add_argument("--sink-tokens", type=integer(0, MAX_CTX), default=4, help="sink: first tokens always kept (default 4, StreamingLLM's)")
    p.add_argument("--prefill-chunk", type=integer(1, MAX_CTX), default=512, help="prompt tokens per forward pass while prefilling (bounds memory) (default 512)")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="weights and activations dtype; auto = bfloat16 on CUDA, float32 on CPU")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    where.add_argument("--devices", type=device_list, help="split the layers over several devices, e.g. cuda:0,cuda:1 "
                       "(a model too large for one: longlora/devices.py)")
    argv = sys.argv[1:] if argv is None else list(argv)
    a = p.parse_args(argv)
    # A cache's own flag with another cache would be ignored: refuse it where it was typed.
    for flag, caches in (("--heavy", ("h2o",)), ("--recent", ("h2o", "sink")), ("--sink-tokens", ("sink",))):
        if a.kv_cache not in caches and any(t == flag or t.startswith(flag + "=") for t in argv):
            p.error(f"{flag} applies to --kv-cache {' or '.join(caches)}, not {a.kv_cache}")
    if a.kv_cache != "full" and a.recent == 0:  # the newest token must stay: it is the one attending
        p.error(f"--kv-cache {a.kv_cache} needs --recent > 0")
    return a


@entry
def main(argv=None) -> int:
    a = parse_args(argv)
    device, dtype = resolve_device_dtype(a.devices or a.device, a.dtype)
    text = read_prompt(a.prompt)
    if a.model is None:
        if a.adapter:
            raise UsageError("--adapter needs --model, the base model it was trained on")
        a.model, a.adapter = demo_model()
        print(f"note: sampling from the demo's best model: --model {a.model} --adapter {a.adapter}", file=sys.stderr)
    model = load_model(a.model, a.adapter, dtype=dtype, device=device, rope_scaling=a.rope_scaling)
    tok = model.tokenizer
    if tok is None:
        raise ValueError(f"{a.model}: no tokenizer (tokenizer.json or tokenizer.model) next to the weights (or in the folder above)")
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
                      eos_ids=tok.eos_ids, seed=a.seed, stats=stats)
    try:
        for piece in stream_text(tok, tokens, context_ids=ids):
            sys.stdout.write(piece)
            sys.stdout.flush()
        print(flush=True)
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
