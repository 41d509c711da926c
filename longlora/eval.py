"""
Does the longer context really work? Perplexity at growing evaluation lengths, and passkey retrieval.

    python -m longlora.eval ppl --model DIR [--adapter DIR] --data a.txt b.txt --seq-lens 2048,4096,8192 --out ppl.json
    python -m longlora.eval ppl --model DIR --tokens data/test.bin --seq-lens 8192,32768 --stride 0     # non-overlapping
    python -m longlora.eval passkey --model DIR [--adapter DIR] --lengths 2000,4000,8000 --trials 10 --png passkey.png
    python -m longlora.eval ppl --model /ckpt/llama-2-70b --devices cuda:0,cuda:1 --data pg19/test --seq-lens 4096

Both use full attention, as the papers do at evaluation (S²-Attn and SF-Attn are training-time
patterns); `--attn s2|sf` evaluates with a training pattern instead.

Perplexity, LongLoRA's protocol (`--stride 256`, the default; their eval.py, itself from landmark
attention). The token stream is a token file, or the documents tokenized as data.py prepares them
([BOS] text [EOS] each, concatenated); N tokens, window length L, stride s = 256:

    window starts   i = 0, s, 2s, ... < N - L, and the LAST of these is dropped (LongLoRA's
                    `all_ix.pop()`; we drop it too, so numbers stay comparable)
    each window     tokens[i : i+L] goes through the model once; its L-1 next-token predictions
                    (positions 0..L-2 predict tokens 1..L-1) are ALL scored
    result          loss = mean over windows of the window's mean loss;  ppl = exp(loss)

    tokens:   |-----------------------------------------------------------|
    window 0  |=========L=========|
    window 1      |=========L=========|           each scores all its L-1 predictions,
    window 2          |=========L=========|       so a token is scored up to L/s times,
    ...                                           with a different amount of context each time

Note that the windows overlap and every one is scored in full: LongLoRA's code does NOT score only the
tokens new to each window (the sliding-window evaluation of Press et al., 2022, that their paper cites
does). Each window counts L-1 predictions, so the mean of window means is the mean over all
(window, token) pairs. It costs N/s forward passes of length L.

Perplexity, non-overlapping (`--stride 0`, cheaper by L/s): windows at 0, L, 2L, ... (every full window),
each scoring its L-1 predictions; each token is scored at most once.

Passkey retrieval as in LongLoRA's passkey_retrivial.py (from landmark attention): a task description,
filler text ("The grass is green. The sky is blue. ..." repeated), the line "The pass key is 12345.
Remember it. 12345 is the pass key." at a random depth, more filler, and "What is the pass key? The
pass key is". Decoding of as many tokens as the key has; correct only if they are exactly the key's
tokens. Differences: we always decode greedily, where LongLoRA's generate() call sets neither do_sample
nor temperature, so it decodes as the model's generation_config.json says (greedy only if that does not
enable sampling); the key is a random 5-digit number (LongLoRA draws randint(1, 50000), 1..50000
inclusive, so some keys are shorter: passkey_retrivial.py @d4eb344, line 56); and the prompt is assembled
in tokens so its length is exactly the one asked for.

In-process use (demo.py): `perplexity(model, tokens, seq_len, stride)`, `passkey_prompt(...)`,
`passkey_accuracy(model, tokenizer, lengths, trials)`, `main(argv)`.
"""

import argparse
import json
import math
import random
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from longlora.data import read_token_file, tokenize_documents
from longlora.adapter import load_model
from longlora.cli import MAX_CTX, Parser, device_list, entry, integer, number, resolve_device_dtype
from longlora.output import atomic_write, building, check_distinct, check_output, write_text
from sample import generate


# ----------------------------------------------------------------------------------------------------
# Perplexity


def window_starts(n_tokens: int, seq_len: int, stride=None) -> list:
    """Where the evaluation windows of length seq_len begin (see the module docstring)."""
    if stride is None:  # non-overlapping: every full window
        starts = list(range(0, n_tokens - seq_len + 1, seq_len))
        need = seq_len
    else:  # LongLoRA's: range(0, N - L, s) without its last element
        starts = list(range(0, n_tokens - seq_len, stride))[:-1]
        need = seq_len + stride + 1
    if not starts:
        raise ValueError(f"{n_tokens} tokens are too few for windows of {seq_len}"
                         + (f" every {stride}" if stride else "") + f" (need at least {need})")
    return starts


@torch.inference_mode()
def perplexity(model, tokens, seq_len: int, stride=None, batch_size: int = 1, attn: str = "full", buckets: int = 0) -> dict:
    """Perplexity of `model` on a token stream (sequence of ints / numpy array) with windows of seq_len.

    stride=None: non-overlapping windows; stride=256: LongLoRA's protocol. attn: the attention the
    model uses meanwhile (restored afterwards). Returns {seq_len, stride, windows, scored, loss, ppl}
    where scored counts (window, token) predictions and loss is their mean negative log-likelihood.

    buckets=n also returns the loss by position in the window: `positions`, n + 1 bounds, and
    `position_loss`, the mean loss of the tokens at window positions [positions[k], positions[k+1]) for each
    k (position 0, the window's first token, is never predicted). Whether the tokens far into the window are
    predicted better than the early ones is whether the model uses the context it was extended to.
    """
    if stride is not None and stride < 1:
        raise ValueError(f"stride must be >= 1 (or None for non-overlapping windows), got {stride}")
    if not 0 <= buckets <= seq_len // 2:  # every bucket then holds a predicted token
        raise ValueError(f"position buckets must be in 0..{seq_len // 2} for windows of {seq_len}, got {buckets}")
    tokens = np.asarray(tokens)
    starts = window_starts(len(tokens), seq_len, stride)
    device = next(model.parameters()).device
    args = getattr(model, "args", None)
    saved_attn = args.attn if args is not None else None
    if args is not None:
        args.attn = attn
    try:
        nll = torch.zeros(seq_len - 1, dtype=torch.float64)  # summed over windows: nll[t] for the token at position t+1
        for i in range(0, len(starts), batch_size):
            x = torch.from_numpy(np.stack([tokens[s:s + seq_len].astype(np.int64) for s in starts[i:i + batch_size]]))
            x = x.to(device)  # (B, L)
            logits = model(x)  # (B, L, V)
            x = x.to(logits.device)  # a model split over devices returns its logits on the last one
            # fp32 log-softmax a slice at a time: a full (L, V) fp32 copy at L=32k, V=32k would be 4 GB
            for b in range(x.shape[0]):
                for c in range(0, seq_len - 1, 4096):
                    e = min(c + 4096, seq_len - 1)
                    nll[c:e] += F.cross_entropy(logits[b, c:e].float(), x[b, c + 1:e + 1], reduction="none").double().cpu()
    finally:
        if args is not None:
            args.attn = saved_attn
    scored = len(starts) * (seq_len - 1)
    loss = nll.sum().item() / scored
    r = dict(seq_len=seq_len, stride=stride, windows=len(starts), scored=scored, loss=loss, ppl=math.exp(loss))
    if buckets:
        bounds = [round(k * seq_len / buckets) for k in range(buckets + 1)]  # window positions
        r["positions"] = bounds
        # nll[t] is the token at position t + 1, so positions [lo, hi) are nll[lo - 1 : hi - 1] (lo = 0: from 0)
        r["position_loss"] = [nll[max(lo - 1, 0):hi - 1].sum().item() / (len(starts) * (hi - max(lo, 1)))
                              for lo, hi in zip(bounds, bounds[1:])]
    return r


# ----------------------------------------------------------------------------------------------------
# Passkey retrieval


TASK = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
        "I will quiz you about the important information there.")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
QUESTION = "What is the pass key? The pass key is"


def _after(tokenizer, before: str, text: str) -> list:
    """text's tokens as they come after `before` in a document: sentencepiece puts a "▁" (space) in front of
    every string it encodes, which a line in the middle of a text does not have, and a byte-level BPE
    tokenizer encodes " 12345" after "is" differently from "12345" alone."""
    lead = tokenizer.encode(before, bos=False)  # e.g. ["▁", "<0x0A>"] for "\n"
    ids = tokenizer.encode(before + text, bos=False)
    return ids[len(lead):] if ids[:len(lead)] == lead else tokenizer.encode(text, bos=False)


def _after_newline(tokenizer, text: str) -> list:
    return _after(tokenizer, "\n", text)


def _newline(tokenizer) -> list:
    """The token(s) of a newline in the middle of a text (without the leading "▁" encode adds)."""
    ids = tokenizer.encode("\n", bos=False)
    return ids[1:] if len(ids) > 1 and tokenizer.decode(ids[1:]) == "\n" else ids


def passkey_prompt(tokenizer, n_tokens: int, depth=None, key=None, seed=0):
    """A passkey prompt of exactly n_tokens tokens: (ids, key, depth).

        <s> TASK \\n filler[:p] \\n The pass key is KEY. Remember it. KEY is the pass key. \\n filler[:q] \\n QUESTION

    The filler is the same token stream for both parts (LongLoRA cuts both from the start of one long
    string); p + q fills the tokens the fixed lines leave and p = round(depth * (p + q)). depth in [0, 1]
    (0 = right after the task, 1 = right before the question) and key (a string of digits) are drawn
    from random.Random(seed) when None.
    """
    rng = random.Random(seed)
    key = str(rng.randint(10000, 99999)) if key is None else str(key)
    depth = rng.random() if depth is None else float(depth)
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    nl = _newline(tokenizer)
    task = tokenizer.encode(TASK, bos=True)
    info = _after_newline(tokenizer, f"The pass key is {key}. Remember it. {key} is the pass key.")
    question = _after_newline(tokenizer, QUESTION)
    n_filler = n_tokens - (len(task) + len(info) + len(question) + 4 * len(nl))
    if n_filler < 0:
        raise ValueError(f"a passkey prompt needs at least {n_tokens - n_filler} tokens, asked for {n_tokens}")
    one = len(_after_newline(tokenizer, FILLER))
    filler = _after_newline(tokenizer, " ".join([FILLER] * (n_filler // max(one, 1) + 2)))[:n_filler]
    p = round(depth * n_filler)
    ids = task + nl + filler[:p] + nl + info + nl + filler[:n_filler - p] + nl + question
    assert len(ids) == n_tokens
    return ids, key, depth


def passkey_trial(model, tokenizer, n_tokens, depth=None, key=None, seed=0, cache="full", **cache_kwargs) -> dict:
    """One passkey prompt, greedy decoding of as many tokens as the key has, exact match of the tokens."""
    ids, key, depth = passkey_prompt(tokenizer, n_tokens, depth, key, seed)
    answer = _after(tokenizer, QUESTION, " " + key)  # e.g. ["▁", "1", "2", "3", "4", "5"]: what follows "is"
    out = list(generate(model, ids, len(answer), temperature=0.0, cache=cache, **cache_kwargs))
    return dict(length=n_tokens, depth=depth, key=key, output=tokenizer.decode(out), correct=out == answer)


def passkey_accuracy(model, tokenizer, lengths, trials=10, depths=None, seed=0, cache="full", **cache_kwargs) -> dict:
    """Passkey accuracy per prompt length: `trials` prompts per length (per depth when `depths` is given,
    else at random depths, LongLoRA's way). Returns {"accuracy": {length: fraction}, "trials": [records]}."""
    records = []
    for n in lengths:
        for d in (depths if depths is not None else [None]):
            for t in range(trials):
                records.append(passkey_trial(model, tokenizer, n, d, None, f"{seed}:{n}:{d}:{t}", cache, **cache_kwargs))
    accuracy = {n: sum(r["correct"] for r in records if r["length"] == n) / sum(r["length"] == n for r in records)
                for n in lengths}
    return dict(accuracy=accuracy, trials=records)


def plot_passkey(result: dict, path, depth_bins=5) -> bool:
    """PNG heat map of accuracy over (prompt length x depth of the key). False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    lengths = list(result["accuracy"])
    hits = np.zeros((depth_bins, len(lengths)))
    total = np.zeros((depth_bins, len(lengths)))
    for r in result["trials"]:
        row = min(int(r["depth"] * depth_bins), depth_bins - 1)  # depth 1.0 goes in the last bin
        hits[row, lengths.index(r["length"])] += r["correct"]
        total[row, lengths.index(r["length"])] += 1
    acc = np.where(total > 0, hits / np.maximum(total, 1), np.nan)
    fig, ax = plt.subplots(figsize=(1.2 * len(lengths) + 2, 3.5))
    im = ax.imshow(acc, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto", origin="upper")
    ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
    ax.set_yticks(range(depth_bins), [f"{i / depth_bins:.0%}-{(i + 1) / depth_bins:.0%}" for i in range(depth_bins)])
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("depth of the key")
    fig.colorbar(im, ax=ax, label="accuracy")
    ax.set_title("passkey retrieval")
    fig.tight_layout()
    atomic_write(str(path), lambda f: fig.savefig(f, dpi=120, format="png"))
    plt.close(fig)
    return True


# ----------------------------------------------------------------------------------------------------
# CLI


def comma_list(item):
    """argparse type: comma-separated values, each parsed (and range-checked) by the type `item`."""
    def parse(s):
        values = [item(x) for x in s.split(",") if x.strip()]
        if not values:
            raise argparse.ArgumentTypeError(f"must be a comma-separated list, got {s!r}")
        return values

    return parse


int_list = comma_list(integer(1, MAX_CTX))  # lengths in tokens
float_list = comma_list(number(0, 1))  # depths


EXAMPLES = ["python -m longlora.eval ppl --model DIR [--adapter DIR] --data a.txt b.txt --seq-lens 2048,4096,8192 --out ppl.json",
            "python -m longlora.eval ppl --model DIR --tokens data/test.bin --seq-lens 8192,32768 --stride 0",
            "python -m longlora.eval passkey --model DIR [--adapter DIR] --lengths 2000,4000,8000 --trials 10 --png passkey.png"]


def parse_args(argv):
    p = Parser(description="Perplexity at several context lengths, and passkey retrieval.", examples=EXAMPLES)
    sub = p.add_subparsers(dest="task", required=True)
    common = Parser(add_help=False)
    common.add_argument("--model", required=True, help="checkpoint directory (Meta, HF, this project's layout or a merged export)")
    common.add_argument("--adapter", help="LoRA adapter directory written by train.py (its RoPE scaling and context are applied)")
    common.add_argument("--rope-scaling", type=number(1), help="linear RoPE factor for a model whose config states none "
                        "(LongAlpaca's fully fine-tuned models ship rope_scaling null); refused where it states another")
    common.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                        help="auto = bfloat16 on CUDA, float32 on CPU")
    where = common.add_mutually_exclusive_group()
    where.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    where.add_argument("--devices", type=device_list, help="split the layers over several devices, e.g. cuda:0,cuda:1 "
                       "(a model too large for one: longlora/devices.py)")
    common.add_argument("--out", help="write the results as JSON to this new file")
    common.add_argument("--overwrite", action="store_true", help="replace --out (and --png) if it exists")

    pp = sub.add_parser("ppl", parents=[common], help="perplexity over long documents at several window lengths",
                        examples=EXAMPLES[:2])
    src = pp.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", nargs="+", help="text files, folders or JSONL (`text` field); each document becomes [BOS] text [EOS], as in train.py")
    src.add_argument("--tokens", help="token file from train.py's data preparation, or a raw little-endian uint16 array of ids "
                                      "(uint32 when the vocabulary exceeds 65536), e.g. LongLoRA's proof-pile test .bin")
    pp.add_argument("--seq-lens", type=int_list, default=[2048, 4096, 8192], help="evaluation window lengths, comma-separated (default 2048,4096,8192)")
    pp.add_argument("--stride", type=integer(0, MAX_CTX), default=256, help="LongLoRA's sliding-window step; 0 = non-overlapping windows (cheaper) (default 256)")
    pp.add_argument("--batch-size", type=integer(1), default=1, help="windows per forward pass (default 1)")
    pp.add_argument("--max-tokens", type=integer(2), help="evaluate only the first this-many tokens of the data")
    pp.add_argument("--attn", default="full", choices=("full", "s2", "sf"), help="attention during evaluation (default full, as in the papers)")
    pp.add_argument("--position-buckets", type=integer(0), default=0, metavar="N", help="also the loss by position in the window, in N "
                    "equal spans: does the model predict tokens far into the window better? (default 0: off)")

    pk = sub.add_parser("passkey", parents=[common], help="passkey retrieval accuracy per prompt length",
                        examples=EXAMPLES[2:])
    pk.add_argument("--lengths", type=int_list, help="prompt lengths in tokens, comma-separated (default: 1/4, 1/2, 3/4 and all of the model's context)")
    pk.add_argument("--trials", type=integer(1), default=10, help="prompts per length (per depth with --depths) (default 10, LongLoRA's)")
    pk.add_argument("--depths", type=float_list, help="fixed depths of the key in [0, 1], comma-separated (default: a random depth per trial)")
    pk.add_argument("--seed", type=integer(0, 2**63 - 1), default=0, help="seed for keys and depths (default 0)")
    pk.add_argument("--kv-cache", default="full", choices=("full", "h2o", "sink"), help="KV cache while decoding the answer (see sample.py and longlora/caches.py) (default full)")
    pk.add_argument("--png", help="also draw accuracy over length x depth into this PNG (needs matplotlib)")
    a = p.parse_args(argv)
    if a.task == "ppl" and not 0 <= a.position_buckets <= min(a.seq_lens) // 2:
        p.error(f"--position-buckets must be in 0..{min(a.seq_lens) // 2} (half the shortest of --seq-lens)")
    return a


def run_ppl(a, model) -> dict:
    if a.tokens:
        tokens = read_token_file(a.tokens, model.args.vocab_size)
    else:
        if model.tokenizer is None:
            raise ValueError(f"{a.model}: no tokenizer (tokenizer.json or tokenizer.model) next to the weights to tokenize --data with")
        tokens = tokenize_documents(a.data, model.tokenizer)
    if a.max_tokens:
        tokens = tokens[:a.max_tokens]
    stride = a.stride or None
    print(f"{len(tokens):,} tokens; windows every {stride or 'L (non-overlapping)'}; attention {a.attn}; "
          f"model context {model.args.max_seq_len} (RoPE scaling {model.args.rope_scaling:g})")
    print(f"{'seq_len':>8} {'windows':>8} {'scored':>11} {'loss':>8} {'ppl':>10} {'seconds':>8}")
    rows = []
    for L in a.seq_lens:
        t0 = time.perf_counter()
        r = perplexity(model, tokens, L, stride, a.batch_size, attn=a.attn, buckets=a.position_buckets)
        r["seconds"] = time.perf_counter() - t0
        note = "  (beyond the model's context)" if L > model.args.max_seq_len else ""
        print(f"{L:>8} {r['windows']:>8} {r['scored']:>11,} {r['loss']:>8.4f} {r['ppl']:>10.3f} {r['seconds']:>8.1f}{note}", flush=True)
        if a.position_buckets:
            bounds = r["positions"]
            print("         loss by position: " + ", ".join(f"{lo}-{hi - 1} {x:.3f}" for lo, hi, x in
                                                          zip(bounds, bounds[1:], r["position_loss"])), flush=True)
        rows.append(r)
    return dict(task="ppl", model=a.model, adapter=a.adapter, tokens=len(tokens), attn=a.attn, results=rows)


def run_passkey(a, model) -> dict:
    tok = model.tokenizer
    if tok is None:
        raise ValueError(f"{a.model}: no tokenizer (tokenizer.json or tokenizer.model) next to the weights")
    if a.png:  # asked for explicitly: say so before the trials run, not after
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise ValueError("--png needs matplotlib (pip install matplotlib)") from None
    ctx = model.args.max_seq_len
    lengths = a.lengths or [ctx // 4, ctx // 2, 3 * ctx // 4, ctx]
    print(f"passkey retrieval: {a.trials} trials per length{' and depth' if a.depths else ''}; "
          f"kv cache {a.kv_cache}; model context {ctx}")
    print(f"{'length':>8} {'accuracy':>9}")
    results = {"accuracy": {}, "trials": []}
    for n in lengths:  # one length at a time, so the table fills in as it goes
        r = passkey_accuracy(model, tok, [n], a.trials, a.depths, a.seed, a.kv_cache)
        results["accuracy"][n] = r["accuracy"][n]
        results["trials"] += r["trials"]
        note = "  (beyond the model's context)" if n > ctx else ""
        print(f"{n:>8} {r['accuracy'][n]:>9.2f}{note}", flush=True)
    if a.png:
        with building(a.png, a.overwrite, is_dir=False) as tmp:
            plot_passkey(results, tmp)
        print(f"wrote {a.png}", file=sys.stderr)
    return dict(task="passkey", model=a.model, adapter=a.adapter, kv_cache=a.kv_cache, **results)


@entry
def main(argv=None) -> int:
    a = parse_args(argv)
    inputs = [("--model", a.model), ("--adapter", a.adapter), ("--tokens", getattr(a, "tokens", None))]
    inputs = [(f, p) for f, p in inputs + [("--data", p) for p in getattr(a, "data", None) or []] if p]
    outputs = [(f"--{flag}", getattr(a, flag, None)) for flag in ("out", "png")]
    check_distinct(*outputs)
    for flag, path in outputs:  # written after all the compute: checked before it
        if path:
            check_output(path, flag, inputs=inputs, overwrite=a.overwrite)
    device, dtype = resolve_device_dtype(a.devices or a.device, a.dtype)
    model = load_model(a.model, a.adapter, dtype=dtype, device=device, rope_scaling=a.rope_scaling)
    result = run_ppl(a, model) if a.task == "ppl" else run_passkey(a, model)
    if a.out:
        text = json.dumps(result, indent=2)
        with building(a.out, a.overwrite, is_dir=False) as tmp:
            write_text(tmp, text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
