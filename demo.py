"""
The whole method on a CPU, end to end: a miniature LongLoRA / SinkLoRA reproduction on real text.

    python demo.py                 # about half an hour on 2 CPU cores (docs/results.md); results in out/demo/
    python demo.py --fast          # the same pipeline with tiny everything (seconds), for a smoke test; out/demo-fast/
    python demo.py --corpus DIR    # your own folder of text files instead of the Python stdlib
    python demo.py --threads 1     # on a machine shared with other jobs (two threads then crawl)

What it does, each step through the project's own code (train.py, sample.py, lora.py, longlora/data.py and eval.py;
in-process calls to their main() and public functions, not toy copies), with the default settings:

  1. corpus      the Python standard library's own .py files (real long documents, on every machine):
                 665 training files and 66 held-out files, ~4.1M and ~254k tokens (test/, tests/,
                 idle_test/ and site-packages are left out), split by md5(relative path) % 10 == 0 -> held-out
  2. tokenizer   sentencepiece BPE trained on the training files with LLaMA's settings (byte fallback,
                 split digits), 2,048 pieces; identity normalisation and kept whitespace, so that code
                 keeps its indentation and decode(encode(text)) == text
  3. data        the training files, for pre-training and for the extension alike
  4. pre-train   a tiny LLaMA (model.py preset "demo": 2.56M parameters, dim 192, 4 layers, 6 heads,
                 SwiGLU 512, RoPE θ=10000) from random weights at a short context S = 256 tokens, full
                 attention: 660 steps x 16 sequences (2.7M tokens), AdamW (0.9, 0.95), weight decay 0.1,
                 lr 2e-3 with 30 warmup steps then cosine to 2e-4                   -> train.py --from-scratch
  5. extend      to 4S = 1024 with linear position interpolation (RoPE positions / 4) and LoRA r=8 α=16
                 on wq wk wv wo with trainable embeddings and norms (LongLoRA's "LoRA+", 444k trainable
                 parameters): 120 steps x 4 sequences of 1024 tokens, lr 3e-3 with 10 warmup steps then
                 cosine to 3e-4; once per training attention: full, s2 with the paper's cyclic roll
                 (--shift-wrap, which lets the first half-group see the last tokens), s2 (no wrap), sf
                 (our reading of SinkLoRA's SF-Attn: s2 plus 4 sink tokens every query sees); then s2
                 twice more, trained the other ways of LongLoRA's Table 2: plain LoRA (--no-train-embed
                 --no-train-norms: 49k trainable parameters) and full fine-tuning (--full: all 2.56M, at
                 lr 3e-4, a tenth of LoRA's: at LoRA's 3e-3, as the paper uses one lr for both, seed 0
                 reaches perplexity 20.6 at 4S, worse than every LoRA run; 3e-4 gives 16.54 (the same
                 run otherwise; no other value measured)). Every run of a seed sees the same batches
                 (and every LoRA run the same LoRA initialisation); two seeds.    -> train.py --attn ...
  6. evaluate    held-out perplexity at S, 2S, 4S on the first 131,072 held-out tokens (non-overlapping
                 windows, full attention, as the papers evaluate) for the base (no interpolation), the
                 interpolated base without fine-tuning (the baseline) and every fine-tuned model; the loss
                 by position in the 4S windows, in 8 spans of S/2 (does a model predict tokens far into
                 the window better, i.e. does it use the context beyond one S2 group of S?); passkey
                 accuracy (LongLoRA's prompt, 20 prompts per length, random depth, greedy, exact match);
                 each method's share of the full-attention improvement at 4S (our formula for the "% of the
                 perplexity improvement" SinkLoRA reports, whose public material gives only the figures):
                     share(m) = (ppl_baseline - ppl_m) / (ppl_baseline - ppl_full)   -> longlora/eval.py
  7. sample      the best fine-tuned model continues the first ~800 tokens of a held-out file
                 (out/demo/prompt.txt -> out/demo/sample.txt)                        -> sample.py

Outputs in --out: results.md (the tables), results.json (every number, per seed, and the stage timings),
results.png (when matplotlib is installed), sample.txt, and the cached tokenizer / base model / adapters,
each with a stamp of its settings (a re-run with the same settings reuses them; delete the folder to
start afresh). Fixed seeds: two fresh runs give the same table (tests/test_demo.py checks it on --fast;
docs/results.md says how the default run was checked). On the same machine with the same --threads, a fresh
run into another folder writes a byte-identical results.md, results.png and sample.txt; another thread count
may change the last digits, since it changes the order of floating-point sums.

What this scale can and cannot show. A 2.6M-parameter model pre-trained on ~2.7M tokens of code
predicts code from its local context; it has not learned to copy from far back: on held-out code, a
50-token passage repeated after 100 tokens is predicted no better the second time than the first (mean
loss 3.35 vs 3.30 per token for this base model). Passkey retrieval needs exactly that skill, so it
stays at zero for every model. Nothing within the budget teaches it (each measured):
LongLoRA-style passkey documents as 10% of the pre-training tokens and 20% of the extension tokens (a
whole run: passkey 0.00 everywhere, and the same ranking of the methods); pre-training on passkey
documents only for 150 steps (the key's digits stay at a loss of ln 10 = 2.30, pure guessing); half
repeated passages of code, 200 and 400 steps; half repeated random 5-digit strings, 600 steps (second
copy 1.95 vs first 1.99). None formed the copying ("induction") mechanism, which in the literature
appears only after far more training, so the demo trains on real text alone and reports passkey as it
is. What it does show is the papers' central comparison: how much of the damage done by position
interpolation each training attention repairs, and how well each one uses the longer context.
"""

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import sys
import sysconfig
import time

import torch

from longlora import eval as evaluation  # renamed so that it does not shadow the builtin
import sample
import train
from longlora.data import tokenize_documents
from longlora.adapter import load_model
from longlora.cli import Parser, UsageError, entry, integer
from longlora.output import STAMP, atomic_write, check_output, lock_output, set_aside, write_text
from longlora.tokenizer import Tokenizer
from model import Transformer


# ----------------------------------------------------------------------------------------------------
# Settings. "full" is the default run; "fast" runs the same code paths with tiny everything.


SETTINGS = {
    "full": dict(
        preset="demo", vocab=2048, short=256, factor=4,
        pre_steps=660, pre_batch=16, pre_lr=2e-3, pre_warmup=30, pre_min_lr=2e-4,
        ext_steps=120, ext_batch=4, ext_lr=3e-3, ext_warmup=10, ext_min_lr=3e-4,
        max_files=None, eval_tokens=131072, passkey_trials=20, sample_tokens=200,
    ),
    "fast": dict(
        preset="tiny", vocab=768, short=128, factor=4,
        pre_steps=40, pre_batch=8, pre_lr=3e-3, pre_warmup=4, pre_min_lr=3e-4,
        ext_steps=6, ext_batch=2, ext_lr=3e-3, ext_warmup=2, ext_min_lr=3e-4,
        max_files=40, eval_tokens=4096, passkey_trials=4, sample_tokens=24,
    ),
}

# The extension runs: name -> train.py flags. The first four train LoRA+ (train.py's default: LoRA on wq wk
# wv wo, trainable embeddings and norms) with each training attention, SinkLoRA's comparison: "s2, wrap" is
# the paper's Algorithm 1 (and LongLoRA's non-flash fallback), whose cyclic roll lets the first half-group of
# the shifted heads see the last tokens (future ones); "s2" is what LongLoRA's default FlashAttention path
# computes (no wrap); "sf" is our reading of SinkLoRA's SF-Attn (s2 + 4 sink tokens). The last two train s2
# the other two ways of LongLoRA's Table 2: plain LoRA (nothing trains but the LoRA matrices) and full
# fine-tuning (every weight, at a tenth of LoRA's learning rate: with LoRA's, as the paper uses one for both,
# it was worse than every LoRA run, see the module docstring).
VARIANTS = {
    "full attn": ["--attn", "full"],
    "s2, wrap": ["--attn", "s2", "--shift-wrap"],
    "s2": ["--attn", "s2"],
    "sf": ["--attn", "sf"],
    "s2, plain LoRA": ["--attn", "s2", "--no-train-embed", "--no-train-norms"],
    "s2, full FT": ["--attn", "s2", "--full", "--lr", "3e-4"],
}
ATTENTIONS = ["full attn", "s2, wrap", "s2", "sf"]  # LoRA+ with each training attention
TRAININGS = ["s2, plain LoRA", "s2", "s2, full FT"]  # s2 trained each way: LongLoRA's Table 2
BUCKETS = 8  # spans of the longest evaluation window for the loss by position
BASE, BASELINE = "base, no interpolation", "interpolation, no fine-tuning"
SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__"}


def log(msg):
    print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------------------------------
# 1. Corpus


def is_heldout(rel_path: str) -> bool:
    """Deterministic split by file name: about one file in ten is held out."""
    return int(hashlib.md5(rel_path.encode("utf-8")).hexdigest(), 16) % 10 == 0


def read_corpus(root: str, stdlib: bool, max_files=None):
    """(train, heldout): lists of (relative path, text), sorted by path.

    stdlib=True: every .py file under root except tests and site-packages. Otherwise every file under
    root that decodes as UTF-8 text. A corpus whose md5 split leaves one side empty (fewer than ~10
    files) is split inside each file instead: the last tenth of every file is held out.
    """
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{root}: no such directory")
    docs = []
    for d, dirs, files in os.walk(root):
        dirs[:] = sorted(x for x in dirs if not (stdlib and x in SKIP_DIRS) and not x.startswith("."))
        for f in sorted(files):
            if stdlib and not f.endswith(".py"):
                continue
            path = os.path.join(d, f)
            try:
                with open(path, encoding="utf-8") as fh:
                    text = fh.read()
            except (UnicodeDecodeError, OSError):
                continue  # binary or unreadable: not text
            if text.strip() and "\x00" not in text:
                docs.append((os.path.relpath(path, root).replace(os.sep, "/"), text))
    docs.sort()
    if max_files is not None:
        # --fast: a small, still deterministic subset that keeps both sides of the split
        held = [d for d in docs if is_heldout(d[0])][: max(1, max_files // 10)]
        docs = [d for d in docs if not is_heldout(d[0])][: max_files - len(held)] + held
        docs.sort()
    if not docs:
        raise ValueError(f"{root}: no UTF-8 text files found")
    train_docs = [d for d in docs if not is_heldout(d[0])]
    held_docs = [d for d in docs if is_heldout(d[0])]
    if not train_docs or not held_docs:
        cut = lambda t: t.rfind("\n", 0, int(len(t) * 0.9)) + 1 or int(len(t) * 0.9)  # at a line end
        train_docs = [(p, t[: cut(t)]) for p, t in docs]
        held_docs = [(p, t[cut(t):]) for p, t in docs if t[cut(t):].strip()]
    return train_docs, held_docs


# ----------------------------------------------------------------------------------------------------
# 2. Tokenizer


def train_tokenizer(texts, prefix: str, vocab_size: int):
    """sentencepiece BPE with LLaMA's settings: byte fallback (no unknown tokens), digits split one by
    one, bos=1 eos=2 unk=0. Unlike LLaMA, identity normalisation and kept whitespace runs, so that
    indentation survives and decode(encode(text)) == text."""
    import sentencepiece as spm

    corpus = prefix + ".txt"
    write_text(corpus, "\n".join(texts))
    spm.SentencePieceTrainer.train(
        input=corpus, model_prefix=prefix, model_type="bpe", vocab_size=vocab_size,
        byte_fallback=True, split_digits=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, character_coverage=1.0,
        bos_id=1, eos_id=2, unk_id=0, pad_id=-1, num_threads=1, minloglevel=2,
        hard_vocab_limit=False,  # a small --corpus gets a smaller vocabulary instead of an error
    )
    os.remove(corpus)
    return prefix + ".model"


# ----------------------------------------------------------------------------------------------------
# 3. Training data


def write_jsonl(path, docs):
    """One {"text": ...} line per document: the format train.py reads (and tokenizes once, then caches)."""
    lines = "".join(json.dumps({"text": text}) + "\n" for _, text in docs)
    write_text(path, lines)


# ----------------------------------------------------------------------------------------------------
# Results: share of the improvement, the table, run-to-run noise, the plot


def share_of_improvement(ppl_baseline: float, ppl_method: float, ppl_full: float) -> float:
    """Our formula for SinkLoRA's "perplexity improvement compared to full attention" (its public material gives
    only the figures, 39% and 92%): 1 = as good as full-attention fine-tuning, 0 = no better than the baseline."""
    return (ppl_baseline - ppl_method) / (ppl_baseline - ppl_full)


def _cell(values, fmt):
    """One table cell: a value per seed, separated by ' / ' (seed 0 first); '-' where there is none."""
    return " / ".join("-" if v is None else fmt.format(v) for v in values)


def results_markdown(res) -> str:
    """The results tables (and the noise summaries under them) as Markdown. Deterministic: no timings."""
    L = res["lengths"]
    long = str(L[-1])
    lines = [f"Held-out perplexity on real text ({res['corpus']['eval_tokens']:,} tokens, non-overlapping windows, "
             f"full attention at evaluation), passkey accuracy ({res['passkey_trials']} prompts per length), and "
             f"each method's share of the full-attention improvement at {long}. Fine-tuned rows give one value per "
             f"seed ({', '.join(map(str, res['seeds']))}); the first four train LoRA+, the last two s2 with plain "
             f"LoRA and with full fine-tuning.", "",
             "| model | " + " | ".join(f"ppl {n}" for n in L) + " | " + " | ".join(f"passkey {n}" for n in L) +
             f" | share {long} |",
             "| --- |" + " ---: |" * (2 * len(L) + 1)]
    for name, m in res["models"].items():
        cells = [_cell(m["ppl"][str(n)], "{:.2f}") for n in L] + [_cell(m["passkey"][str(n)], "{:.2f}") for n in L]
        cells.append(_cell(m["share"], "{:.2f}") if "share" in m else "")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    n = res["noise"]
    if n:
        pairs = "; ".join(f"{a} -> {b}: {_cell(g, '{:+.2f}')}" for a, b, g in zip(n["order"], n["order"][1:], n["paired_gaps"]))
        lines += ["", f"Run-to-run noise at {long}: the largest seed-to-seed difference of one LoRA+ variant's perplexity is "
                  f"{n['max_seed_diff']:.2f}. LoRA+ variants by mean perplexity: {' < '.join(n['order'])}; gaps between "
                  f"neighbours {', '.join(f'{g:.2f}' for g in n['gaps'])}; the same gaps within each seed (same data "
                  f"order and LoRA init): {pairs}. Every seed ranks the variants "
                  + ("the same way." if n["same_order_every_seed"] else "differently: the order is not settled.")]
    t = res["training"]
    if t:
        lines += ["", f"LongLoRA's Table 2 at this scale (s2 at {long}, within each seed: same batches, same LoRA init): "
                  f"plain LoRA -> LoRA+ {_cell(t['lora_to_lora_plus'], '{:+.2f}')}, LoRA+ -> full fine-tuning "
                  f"{_cell(t['lora_plus_to_full_ft'], '{:+.2f}')}; LoRA+ closes {_cell(t['gap_closed'], '{:.2f}')} of the "
                  f"gap between plain LoRA and full fine-tuning; the largest seed-to-seed difference of these three "
                  f"rows is {t['max_seed_diff']:.2f}."]
    bounds = res["positions"]
    spans = [f"{lo}-{hi - 1}" for lo, hi in zip(bounds, bounds[1:])]
    reference = res["models"]["full attn"]["position_loss"]
    lines += ["", f"Held-out loss (nats per token) by position in the {long}-token windows, mean over seeds. The spans hold "
              f"different text, so compare models within a span; the last column: each fine-tuned model's loss in the last "
              f"span minus full attention's, per seed (same batches).", "",
              "| model | " + " | ".join(spans) + f" | {spans[-1]} vs full attn |", "| --- |" + " ---: |" * (len(spans) + 1)]
    for name, m in res["models"].items():
        per_seed = m["position_loss"]
        mean = [sum(v) / len(v) for v in zip(*per_seed)]
        behind = _cell([v[-1] - r[-1] for v, r in zip(per_seed, reference)], "{:+.3f}") if name in VARIANTS else ""
        lines.append(f"| {name} | " + " | ".join(f"{x:.3f}" for x in mean) + f" | {behind} |")
    return "\n".join(lines) + "\n"


def noise_summary(res) -> dict:
    """Seed-to-seed spread vs the gaps between the LoRA+ variants (ATTENTIONS) at the longest length.

    Two views: the largest difference between two seeds of one variant (unpaired, conservative), and
    the gaps between neighbouring variants within each seed (paired: same data order, same LoRA init),
    with whether every seed ranks the variants the same way.
    """
    long = str(res["lengths"][-1])
    ft = {k: res["models"][k]["ppl"][long] for k in ATTENTIONS if k in res["models"]}
    if not ft or len(res["seeds"]) < 2:
        return {}
    mean = {k: sum(v) / len(v) for k, v in ft.items()}
    order = sorted(mean, key=mean.get)
    per_seed = [sorted(ft, key=lambda k: ft[k][s]) for s in range(len(res["seeds"]))]
    return dict(max_seed_diff=max(max(v) - min(v) for v in ft.values()), order=order,
                gaps=[mean[b] - mean[a] for a, b in zip(order, order[1:])],
                paired_gaps=[[ft[b][s] - ft[a][s] for s in range(len(res["seeds"]))] for a, b in zip(order, order[1:])],
                same_order_every_seed=all(o == order for o in per_seed))


def training_summary(res) -> dict:
    """LongLoRA's Table 2 question at the longest length, per seed: the gaps plain LoRA -> LoRA+ -> full
    fine-tuning (all s2), and the share of the plain-LoRA-to-full gap that LoRA+ closes (1 = all of it)."""
    long = str(res["lengths"][-1])
    lora, plus, full = (res["models"][k]["ppl"][long] for k in TRAININGS)
    return dict(lora_to_lora_plus=[b - a for a, b in zip(lora, plus)],
                lora_plus_to_full_ft=[c - b for b, c in zip(plus, full)],
                gap_closed=[(a - b) / (a - c) for a, b, c in zip(lora, plus, full)],
                max_seed_diff=max(max(v) - min(v) for v in (lora, plus, full)))


def plot_results(res, path) -> bool:
    """results.png: perplexity vs evaluation length (left), each method's share of the full-attention
    improvement at the longest length, one dot per seed (middle), and the loss by position in the longest
    windows, mean over seeds (right). False without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    L = res["lengths"]
    fig, (ax, bx, cx) = plt.subplots(1, 3, figsize=(17, 4.6), gridspec_kw=dict(width_ratios=[3, 2, 3]))
    for name, m in res["models"].items():
        values = [m["ppl"][str(n)] for n in L]
        mean = [sum(v) / len(v) for v in values]
        err = [[a - min(v) for a, v in zip(mean, values)], [max(v) - a for a, v in zip(mean, values)]]
        ax.errorbar(L, mean, yerr=err, marker="o", capsize=3, label=name)
    ax.set_xscale("log", base=2)
    ax.set_xticks(L, [str(n) for n in L])
    ax.set_xlabel("evaluation length (tokens)")
    ax.set_ylabel("held-out perplexity (mean, range over seeds)")
    ax.set_title(f"pre-trained at {L[0]}, extended to {L[-1]}")
    ax.legend(fontsize=8)
    names = [k for k in VARIANTS if k in res["models"]]
    for i, k in enumerate(names):
        shares = res["models"][k]["share"]
        bx.barh(i, sum(shares) / len(shares), color="C%d" % (i + 2), alpha=0.6)
        bx.plot(shares, [i] * len(shares), "k.")
    bx.set_yticks(range(len(names)), names)
    bx.invert_yaxis()
    bx.set_xlabel(f"share of the full-attention improvement at {L[-1]}")
    bx.axvline(1.0, color="gray", lw=0.8)
    lowest = min(v for k in names for v in res["models"][k]["share"])
    if 0 < lowest < 1:  # zoom in on the differences (the bars then start at the left edge, not at 0)
        bx.set_xlim(max(0.0, lowest - 0.1), 1.02)
    bounds = res["positions"]
    mids = [(lo + hi) / 2 for lo, hi in zip(bounds, bounds[1:])]
    for i, (name, m) in enumerate(res["models"].items()):
        if name != BASE:  # beyond its context it climbs off the scale of the others
            cx.plot(mids, [sum(v) / len(v) for v in zip(*m["position_loss"])], marker=".", color=f"C{i}", label=name)
    cx.axvline(L[0], color="gray", lw=0.8, ls="--")
    cx.set_xlabel(f"position in the {L[-1]}-token window (dashed: {L[0]}, the pre-training context)")
    cx.set_ylabel("held-out loss (nats per token, mean over seeds)")
    cx.set_title("does it use the longer context?")
    cx.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, dpi=110, format="png"))
    plt.close(fig)
    return True


# ----------------------------------------------------------------------------------------------------
# The pipeline


def fingerprint(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cached(path, stamp) -> bool:
    """True when `path` holds the result of a finished stage with exactly these settings."""
    try:
        with open(os.path.join(path, "demo_stamp.json")) as f:
            return json.load(f)["stamp"] == stamp
    except (OSError, ValueError, KeyError):
        return False


def run_stage(what, path, stamp, argv, module):
    """Run `module.main(argv)` (train.py, in this process) unless `path` already holds its result."""
    if cached(path, stamp):
        log(f"{what}: cached in {path}")
        return
    if os.path.isdir(path):  # an unfinished stage of this run (its settings are OUT's): start it again, if ours
        if not any(os.path.exists(os.path.join(path, n)) for n in (STAMP, "demo_stamp.json")):
            raise UsageError(f"{path} was not written by demo.py; move it away or choose another --out")
        shutil.rmtree(path)
    log(f"{what}: python {module.__name__}.py {' '.join(argv)}")
    t0 = time.time()
    code = module.main(argv)
    if code != 0:
        print(f"{what} failed ({module.__name__}.py exited with {code}; its error is above)", file=sys.stderr)
        raise SystemExit(code)
    text = json.dumps({"stamp": stamp, "seconds": round(time.time() - t0, 1)})
    write_text(os.path.join(path, "demo_stamp.json"), text)
    log(f"{what}: done in {time.time() - t0:.0f} s")


def evaluate_model(model, tokens, tokenizer, lengths, trials):
    """Held-out perplexity at every length (non-overlapping windows), the loss by position in the longest
    windows (BUCKETS spans, from the same pass), and passkey accuracy at every length."""
    ppl = {}
    for n in lengths:
        r = evaluation.perplexity(model, tokens, n, stride=None, buckets=BUCKETS if n == lengths[-1] else 0)
        ppl[str(n)] = r["ppl"]
    fits = [n for n in lengths if passkey_fits(tokenizer, n)]
    pk = evaluation.passkey_accuracy(model, tokenizer, fits, trials=trials, seed=0)["accuracy"]
    return ppl, {str(n): pk.get(n) for n in lengths}, r["positions"], r["position_loss"]


def passkey_fits(tokenizer, n_tokens) -> bool:
    """Whether a passkey prompt fits in n_tokens (its fixed lines take ~75 tokens with the default vocabulary)."""
    try:
        evaluation.passkey_prompt(tokenizer, n_tokens)
        return True
    except ValueError:
        return False


def default_out(a) -> str:
    """out/demo for the default settings; other settings get a folder of their own, never the default run's."""
    name = "demo" + ("-fast" if a.fast else "") + (f"-seeds{a.seeds}" if a.seeds != 2 else "")
    if a.corpus:
        name += "-" + re.sub(r"[^\w.-]", "_", os.path.basename(os.path.realpath(a.corpus)))
    return os.path.join("out", name)


def settings_of(out):
    """The settings fingerprint of the demo run in `out` (OUT/.demo), or None."""
    try:
        with open(os.path.join(out, ".demo")) as f:
            return json.load(f)["settings"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


@entry
def main(argv=None) -> int:
    p = Parser(description="\n\n".join(__doc__.strip().split("\n\n")[:2]),
               examples=["python demo.py", "python demo.py --fast", "python demo.py --corpus DIR --threads 1"])
    p.add_argument("--out", help="output folder (results and cached models; default out/demo, and a folder of their own "
                   "for other settings: out/demo-fast, out/demo-seeds3, out/demo-NAME for --corpus NAME, ...)")
    p.add_argument("--overwrite", action="store_true", help="replace an --out that holds a demo run of other settings")
    p.add_argument("--fast", action="store_true", help="tiny everything: the same pipeline in seconds (a smoke test)")
    p.add_argument("--seeds", type=integer(1), default=2, help="seeds for the extension runs (default 2: run-to-run noise)")
    p.add_argument("--corpus", help="folder of your own UTF-8 text files (default: the Python standard library)")
    p.add_argument("--threads", type=integer(1, 4096), default=None, help="CPU threads for torch (default: torch's choice); use 1 "
                   "on a machine other jobs share, where more threads than free cores slow training many times over")
    a = p.parse_args(argv)
    a.out = a.out or default_out(a)
    threads = torch.get_num_threads()
    torch.set_num_threads(a.threads or threads)
    try:
        with contextlib.ExitStack() as held:  # the lock run() takes on --out, released when it ends
            return run(a, held)
    finally:
        torch.set_num_threads(threads)  # in-process callers (the tests) get their setting back


def run(a, held) -> int:
    c = SETTINGS["fast" if a.fast else "full"]
    S = c["short"]
    ctx = c["factor"] * S
    lengths = [S, 2 * S, ctx]
    seeds = list(range(a.seeds))
    out = a.out
    # Only into a folder of its own: a new or empty one, or one an earlier demo.py wrote (OUT/.demo), which
    # caches the stages it finished. Its settings must be this run's; another run is replaced only with --overwrite.
    check_output(out, "--out", is_dir=True, inputs=[("--corpus", a.corpus)] if a.corpus else [],
                 ours=[".demo"], overwrite=a.overwrite, grows=True)
    t_start = time.time()
    timings = {}

    # -- 1. corpus
    root = a.corpus or sysconfig.get_paths()["stdlib"]
    try:
        train_docs, held_docs = read_corpus(root, stdlib=a.corpus is None, max_files=c["max_files"])
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(f"--corpus {e}" if a.corpus else str(e)) from None
    corpus_id = fingerprint([(p_, hashlib.md5(t.encode()).hexdigest()) for p_, t in train_docs + held_docs])
    log(f"corpus: {root}: {len(train_docs)} training files, {len(held_docs)} held-out files")
    settings = fingerprint(corpus_id, c, VARIANTS, seeds)
    if os.path.isdir(out) and os.listdir(out) and settings_of(out) != settings:
        if not a.overwrite:
            raise UsageError(f"--out {out} holds a demo run with other settings (corpus, --fast, --seeds) or another "
                             "result; choose another --out, or add --overwrite to replace it")
        set_aside(out, "--out")
    held.enter_context(lock_output(out, "--out"))  # one demo.py per folder at a time
    write_text(os.path.join(out, ".demo"), json.dumps({"settings": settings}))
    os.makedirs(os.path.join(out, "data", "heldout"), exist_ok=True)

    # -- 2. tokenizer
    tok_stamp = fingerprint(corpus_id, c["vocab"])
    tok_dir = os.path.join(out, "tokenizer")
    tok_path = os.path.join(tok_dir, "tokenizer.model")
    if not cached(tok_dir, tok_stamp):
        os.makedirs(tok_dir, exist_ok=True)
        t0 = time.time()
        train_tokenizer([t for _, t in train_docs], os.path.join(tok_dir, "tokenizer"), c["vocab"])
        write_text(os.path.join(tok_dir, "demo_stamp.json"), json.dumps({"stamp": tok_stamp}))
        log(f"tokenizer: sentencepiece BPE, {c['vocab']} pieces, trained in {time.time() - t0:.1f} s")
    tokenizer = Tokenizer(tok_path)

    # -- 3. data: the training files (for pre-training and for the extension alike), the held-out files
    data = os.path.join(out, "data")
    train_data = os.path.join(data, "train.jsonl")
    write_jsonl(train_data, train_docs)
    held_paths = []
    for i, (_, text) in enumerate(held_docs):
        path = os.path.join(data, "heldout", f"{i:04d}.txt")
        if not os.path.exists(path) or open(path, encoding="utf-8").read() != text:
            write_text(path, text)
        held_paths.append(path)
    held_tokens = tokenize_documents(held_paths, tokenizer)
    eval_tokens = held_tokens[: c["eval_tokens"]]
    if len(eval_tokens) < ctx:
        raise UsageError(f"the held-out text has {len(held_tokens)} tokens, fewer than one {ctx}-token evaluation "
                         f"window; give --corpus more text")
    log(f"data: {len(train_docs)} training documents; held-out {len(held_tokens):,} tokens, {len(eval_tokens):,} evaluated")

    # -- 4. pre-training at S, full attention, every parameter
    tokens_dir = os.path.join(out, "tokens")
    base_dir = os.path.join(out, "base")
    base_stamp = fingerprint(tok_stamp, {k: v for k, v in c.items() if k.startswith("pre")}, c["preset"], S)
    t0 = time.time()
    run_stage(f"pre-training {c['preset']} at {S} tokens", base_dir, base_stamp, [
        "--from-scratch", c["preset"], "--tokenizer", tok_path, "--data", train_data, "--ctx", str(S), "--attn", "full",
        "--steps", str(c["pre_steps"]), "--batch-size", str(c["pre_batch"]), "--grad-accum", "1",
        "--lr", str(c["pre_lr"]), "--warmup", str(c["pre_warmup"]), "--schedule", "cosine",
        "--min-lr-ratio", str(c["pre_min_lr"] / c["pre_lr"]), "--weight-decay", "0.1", "--beta2", "0.95",
        "--seed", "0", "--heldout", "0", "--no-grad-ckpt", "--save-every", str(c["pre_steps"]), "--keep", "1",
        "--log-every", str(max(1, c["pre_steps"] // 12)), "--token-cache", tokens_dir, "--out", base_dir], train)
    timings["pretrain_s"] = round(time.time() - t0, 1)

    # -- 5. context extension to 4S: one LoRA run per attention variant and seed
    t0 = time.time()
    trained = {}  # (name, seed) -> (model dir, adapter dir or None): full fine-tuning writes a whole model
    for seed in seeds:
        for name, flags in VARIANTS.items():
            run_dir = os.path.join(out, "runs", f"{name.replace(', ', '-').replace(' ', '-')}-seed{seed}")
            stamp = fingerprint(base_stamp, {k: v for k, v in c.items() if k.startswith("ext")}, flags, seed, ctx)
            run_stage(f"extension to {ctx}, {name}, seed {seed}", run_dir, stamp, [
                "--model", base_dir, "--data", train_data, "--ctx", str(ctx),
                "--steps", str(c["ext_steps"]), "--batch-size", str(c["ext_batch"]), "--grad-accum", "1",
                "--lr", str(c["ext_lr"]), "--warmup", str(c["ext_warmup"]), "--schedule", "cosine",
                "--min-lr-ratio", str(c["ext_min_lr"] / c["ext_lr"]), "--seed", str(seed), "--heldout", "0",
                "--no-grad-ckpt", "--save-every", str(c["ext_steps"]), "--keep", "1",
                "--log-every", str(max(1, c["ext_steps"] // 6)), "--token-cache", tokens_dir, "--out", run_dir,
                *flags], train)  # the variant's flags last: they win (full fine-tuning's own --lr)
            trained[name, seed] = (run_dir, None) if "--full" in flags else (base_dir, run_dir)
    timings["extension_s"] = round(time.time() - t0, 1)

    # -- 6. evaluation: full attention, the same held-out tokens and passkey prompts for every model
    t0 = time.time()
    trials = c["passkey_trials"]
    models = {}

    positions = []

    def record(name, model):
        t1 = time.time()
        ppl, pk, positions[:], position_loss = evaluate_model(model, eval_tokens, tokenizer, lengths, trials)
        m = models.setdefault(name, {"ppl": {str(n): [] for n in lengths}, "passkey": {str(n): [] for n in lengths},
                                     "position_loss": []})
        for n in lengths:
            m["ppl"][str(n)].append(ppl[str(n)])
            m["passkey"][str(n)].append(pk[str(n)])
        m["position_loss"].append(position_loss)
        log(f"eval {name}: ppl " + ", ".join(f"{n}: {ppl[str(n)]:.2f}" for n in lengths) +
            f"; passkey " + ", ".join(f"{n}: {pk[str(n)]}" for n in lengths) + f" ({time.time() - t1:.0f} s)")

    base = Transformer.from_pretrained(base_dir).eval()
    base.args.max_seq_len = ctx  # evaluated beyond its context on purpose: RoPE positions it never saw
    record(BASE, base)
    record(BASELINE, Transformer.from_pretrained(base_dir, rope_scaling=float(c["factor"]), max_seq_len=ctx).eval())
    for seed in seeds:
        for name in VARIANTS:
            record(name, load_model(*trained[name, seed]))
    long = str(ctx)
    b = models[BASELINE]["ppl"][long][0]
    for name in VARIANTS:
        m = models[name]
        m["share"] = [share_of_improvement(b, v, f) for v, f in zip(m["ppl"][long], models["full attn"]["ppl"][long])]
    timings["eval_s"] = round(time.time() - t0, 1)

    res = dict(lengths=lengths, seeds=seeds, passkey_trials=trials, settings=c, models=models, positions=positions,
               corpus=dict(root=root, train_files=len(train_docs), heldout_files=len(held_docs),
                           heldout_tokens=int(len(held_tokens)), eval_tokens=int(len(eval_tokens))))
    res["noise"] = noise_summary(res)
    res["training"] = training_summary(res)

    # -- 7. a sample from the best fine-tuned model (lowest mean perplexity at 4S), through sample.py
    t0 = time.time()
    best = min(VARIANTS, key=lambda k: sum(models[k]["ppl"][long]) / len(models[k]["ppl"][long]))
    prompt_ids = held_tokens[: ctx - c["sample_tokens"] - 16].tolist()
    prompt_path = os.path.join(out, "prompt.txt")
    prompt_text = tokenizer.decode(prompt_ids)
    write_text(prompt_path, prompt_text)
    buf = io.StringIO()
    model_dir, adapter_dir = trained[best, 0]
    with contextlib.redirect_stdout(buf):
        code = sample.main(["--model", model_dir, *(["--adapter", adapter_dir] if adapter_dir else []), "--prompt",
                            prompt_path, "--max-new-tokens", str(c["sample_tokens"]), "--seed", "0"])
    if code != 0:
        raise SystemExit(code)  # sample.py printed its error
    text = f"# best model: {best} (seed 0); prompt: prompt.txt ({len(prompt_ids)} tokens), which ends with:\n" + \
        prompt_text[-400:] + "\n# continuation (sample.py, temperature 0.6, top-p 0.9, seed 0):\n" + buf.getvalue()
    write_text(os.path.join(out, "sample.txt"), text)
    res["sample"] = dict(model=best, prompt=prompt_path, continuation=buf.getvalue(),  # sample.py's default model:
                         base=os.path.relpath(model_dir, out), adapter=adapter_dir and os.path.relpath(adapter_dir, out))
    timings["sample_s"] = round(time.time() - t0, 1)

    # -- results
    md = results_markdown(res)
    write_text(os.path.join(out, "results.md"), md)
    res["plot"] = plot_results(res, os.path.join(out, "results.png"))
    timings["total_s"] = round(time.time() - t_start, 1)
    res["timings"] = timings
    text = json.dumps(res, indent=2)
    write_text(os.path.join(out, "results.json"), text + "\n")
    print()
    print(md)
    print(f"sample from the best model ({best}):\n{buf.getvalue()}")
    log(f"wrote {out}/results.md, results.json" + (", results.png" if res["plot"] else " (no results.png: matplotlib is not installed)") +
        f", sample.txt; total {timings['total_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
