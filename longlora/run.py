"""
train.py's plumbing, so that train.py shows the algorithm: its flags and their checks, the data it reads, stop
signals, memory and time in the log, and the result it writes.

    a = parse_args(argv, RECIPE)      # train.py's recipe as the defaults; a mistake is one error line
    train_data, held_data = load_data(a, tokenizer, local_rank, distributed, wait_group)
    write_result(a, model, tensors, base_fingerprint, save_dtype, tokenizer_path)    # rank 0, at the end
"""

import glob
import hashlib
import json
import os
import shutil
import signal
import sys
from dataclasses import asdict

import numpy as np
import torch

from attention import flash_varlen, resolve_group_size
from longlora.adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS, check_storable, save_adapter
from longlora.checkpoint import checkpoint_dirs, comparable, find_resumable
from longlora.cli import MAX_CTX, Parser, UsageError, integer, number
from longlora.data import (SFT_TEMPLATES, PackedData, SFTData, open_tokens, prepare_sft, prepare_tokens, split_heldout)
from longlora.output import STAMP, check_output, install_files, lock_output, set_aside
from longlora.shard import on_some_ranks
from longlora.tokenizer import find_tokenizer
from longlora.weights import MODEL_CONFIGS, MODEL_FILES, check_exportable, checkpoint_layout, write_model
from lora import TARGETS, apply_lora, mark_trainable
from model import PRESETS, ModelArgs, Transformer


# ----------------------------------------------------------------------------------------------------
# Flags and their checks


def parse_args(argv, recipe):
    """train.py's flags, parsed and checked (a mistake raises UsageError: one line, exit 2)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    a = build_parser(recipe).parse_args(argv)
    check_args(a, argv)
    return a


def sft_group_rule(a):
    """--sft with s2/sf and no --group-size: the group size is chosen per micro-batch, by LongLoRA's SFT rule
    ("official", data.longlora_sft_group_size) or as a quarter of the padded batch ("quarter"); else None."""
    if not (a.sft and a.attn != "full" and a.group_size is None):
        return None
    return a.sft_group_size or ("quarter" if a.shift_wrap else "official")


def pad_multiple(a):
    """SFT pads each batch to a multiple of this, so that a padded length is also tiled by the groups."""
    return a.group_size if (a.attn != "full" and a.group_size) else 8


def build_parser(recipe):
    """train.py's flags; the defaults of the recipe's flags are `recipe` (train.RECIPE)."""
    p = Parser(description="Long-context LoRA fine-tuning of LLaMA2 (LongLoRA / SinkLoRA) with FSDP2; "
                           "run with python (one process) or torchrun (several).",
               examples=["python train.py --model llama-2-7b --data pg19/train --ctx 8192 --out out/7b-8k",
                         "torchrun --standalone --nproc_per_node=8 train.py --model llama-2-7b --data redpajama.jsonl "
                         "--ctx 32768 --out out/7b-32k [--resume out/7b-32k]",
                         "python train.py --estimate --preset llama2-7b --ctx 32768 --gpus 8"])
    src = p.add_argument_group("model")
    src.add_argument("--model", help="base checkpoint directory (Meta, HF or this project's layout); "
                     "one of --model, --preset, --from-scratch is required")
    src.add_argument("--preset", choices=sorted(PRESETS), help="instead of --model: a randomly initialised base of this "
                     "shape (LoRA training; for tests and --estimate)")
    src.add_argument("--from-scratch", metavar="PRESET", choices=sorted(PRESETS),
                     help="full-parameter training of a randomly initialised PRESET (no LoRA, RoPE unscaled, vocabulary "
                          "from --tokenizer); the result is a whole model in model.py's layout")
    src.add_argument("--full", action="store_true", help="full fine-tuning of --model (or --preset): every parameter trains, "
                     "no LoRA (LongLoRA's --low_rank_training False); the result is a whole model in --model's layout")
    src.add_argument("--tokenizer", help="a sentencepiece tokenizer.model, an HF tokenizer.json, or a folder holding "
                     "one (default: the one next to --model)")
    d = p.add_argument_group("data")
    d.add_argument("--data", nargs="+", help="(required, except with --estimate) training text: files, folders (all "
                   "files inside) or JSONL/JSON with a 'text' field; with --sft, JSON/JSONL records {instruction, input?, output}")
    d.add_argument("--sft", action="store_true", help="supervised fine-tuning: instruction records, loss on answers only")
    d.add_argument("--sft-template", choices=SFT_TEMPLATES, default="llama2", help="--sft prompt format: LLaMA2-chat's "
                   "[INST] turn, LongAlpaca's exact one (LongLoRA's supervised-fine-tune.py), or chat: the model's own "
                   "chat template (as sample.py --chat for a model that has one)")
    d.add_argument("--sft-group-size", choices=("official", "quarter"), help="--sft groups: LongLoRA's SFT rule (default; "
                   "see longlora/data.py) or T/4 of the padded batch (the default with --shift-wrap, as LongLoRA's non-flash path)")
    d.add_argument("--ctx", type=integer(1, MAX_CTX), help="training sequence length; sets the RoPE interpolation factor "
                   "ceil(ctx / the model's original context)")
    d.add_argument("--heldout", type=number(0, 1, hi_open=True), default=0.01, help="fraction of sequences held out for evaluation (evenly spread)")
    d.add_argument("--eval-data", nargs="+", help="separate held-out data (then nothing of --data is held out)")
    d.add_argument("--token-cache", help="folder for the tokenized data, reused across runs (default: OUT/tokens)")
    at = p.add_argument_group("attention")
    at.add_argument("--attn", choices=("full", "s2", "sf"),
                    help="training attention: full, S²-Attn (LongLoRA) or SF-Attn (SinkLoRA); evaluation uses full")
    at.add_argument("--group-size", type=integer(2, MAX_CTX), help="S²/SF group size (default ctx/4, LongLoRA's ratio)")
    at.add_argument("--sink-tokens", type=integer(0, MAX_CTX), default=4, help="SF-Attn: leading tokens every query sees")
    at.add_argument("--shift-wrap", action="store_true", help="S²: the paper's cyclic roll (leaks future tokens; ablation only)")
    lo = p.add_argument_group("LoRA (not with --from-scratch or --full)")
    lo.add_argument("--lora-r", type=integer(1, 2**16), help="LoRA rank")
    lo.add_argument("--lora-alpha", type=number(0, lo_open=True), help="LoRA alpha; the update is scaled by alpha/r")
    lo.add_argument("--lora-dropout", type=number(0, 1, hi_open=True), help="dropout on the LoRA input")
    lo.add_argument("--lora-targets", nargs="+", choices=TARGETS, help="layers that get LoRA")
    lo.add_argument("--no-train-embed", action="store_true", help="freeze tok_embeddings (LongLoRA trains them)")
    lo.add_argument("--no-train-norms", action="store_true", help="freeze the RMSNorm weights (LongLoRA trains them)")
    o = p.add_argument_group("optimisation")
    o.add_argument("--steps", type=integer(1), help="optimizer steps")
    o.add_argument("--batch-size", type=integer(1), help="sequences per micro-batch per process")
    o.add_argument("--grad-accum", type=integer(1), help="micro-batches per optimizer step")
    o.add_argument("--lr", type=number(0, lo_open=True), help="peak learning rate (AdamW)")
    o.add_argument("--warmup", type=integer(0), help="linear warmup steps")
    o.add_argument("--schedule", choices=("constant", "cosine"), help="after warmup")
    o.add_argument("--min-lr-ratio", type=number(0, 1), default=0.1, help="cosine: final lr = lr x this")
    o.add_argument("--weight-decay", type=number(0), help="AdamW weight decay (matrices only, not norms)")
    o.add_argument("--beta2", type=number(0, 1, hi_open=True), help="AdamW beta2 (beta1 is 0.9)")
    o.add_argument("--grad-clip", type=number(0), help="clip the global gradient norm (0: off)")
    o.add_argument("--seed", type=integer(0, 2**63 - 1), default=0, help="seed of the LoRA/model init and the data order")
    o.add_argument("--dtype", choices=("auto", "bf16", "fp32"), default="auto",
                   help="compute dtype: auto = bf16 on GPU (frozen weights bf16, trainable fp32), fp32 on CPU")
    o.add_argument("--no-grad-ckpt", action="store_true", help="keep all activations instead of recomputing blocks in backward")
    o.add_argument("--no-ffn-chunks", action="store_true", help="run the feed-forward over the whole sequence at "
                   "once, not in checkpointed chunks: faster (no second forward of it in backward) where memory allows; --estimate "
                   "counts either")
    o.add_argument("--offload-activations", action="store_true", help="keep the checkpointed block inputs in (pinned) "
                   "host memory until backward needs them: GPU memory for contexts that do not fit otherwise")
    r = p.add_argument_group("output")
    r.add_argument("--out", help="(required, except with --estimate) output folder: metrics.jsonl, checkpoints/, and "
                   "the final adapter or model")
    r.add_argument("--save-every", type=integer(1), default=100, help="checkpoint every N steps (and at the end)")
    r.add_argument("--keep", type=integer(1), default=2, help="checkpoints to keep")
    r.add_argument("--resume", metavar="DIR", help="continue from a checkpoint, or from the newest one of a run folder")
    r.add_argument("--overwrite", action="store_true", help="start afresh in an --out that holds an earlier run or result "
                   "this project wrote: it is deleted first (default: refused)")
    r.add_argument("--eval-every", type=integer(0), default=0, help="held-out loss every N steps and before training (0: at the end only)")
    r.add_argument("--eval-samples", type=integer(0), default=32, help="held-out sequences per evaluation")
    r.add_argument("--log-every", type=integer(1), default=1, help="print every N steps (metrics.jsonl gets every step)")
    e = p.add_argument_group("estimate")
    e.add_argument("--estimate", action="store_true", help="print per-GPU memory and FLOPs per step for --preset/--model, "
                   "--ctx, --attn, --gpus, --batch-size, --grad-accum, then exit (no weights are loaded)")
    e.add_argument("--gpus", type=integer(1, 2**20), default=8, help="--estimate: number of GPUs")
    p.set_defaults(**recipe)
    return p


def typed(flag, argv):
    """Whether `flag` was given on the command line (not just its default)."""
    return any(t == flag or t.startswith(flag + "=") for t in argv)


def check_args(a, argv):
    """Catch a user's mistakes before any work; every message names the flag. argv: the flags as typed."""
    sources = [s for s in ("model", "preset", "from_scratch") if getattr(a, s)]
    if len(sources) > 1 or not (sources or a.estimate):  # (--estimate alone describes LLaMA2-7B)
        raise UsageError("give exactly one of --model, --preset, --from-scratch" + (f" (got {', '.join('--' + s.replace('_', '-') for s in sources)})" if sources else ""))
    lora_flags = [f for f in ("--lora-r", "--lora-alpha", "--lora-dropout", "--lora-targets") if typed(f, argv)]
    if a.full and a.from_scratch:
        raise UsageError("--full fine-tunes --model or --preset; --from-scratch already trains every parameter")
    if (a.from_scratch or a.full) and (lora_flags or a.no_train_embed or a.no_train_norms):
        raise UsageError(f"--{'full' if a.full else 'from-scratch'} trains every parameter; "
                         f"{(lora_flags or ['--no-train-embed' if a.no_train_embed else '--no-train-norms'])[0]} does not apply")
    # (The numbers' ranges are checked as they are parsed: the types in build_parser.)
    for flag, needs, ok in (("--sft-template", "--sft", a.sft), ("--sink-tokens", "--attn sf", a.attn == "sf"),
                            ("--shift-wrap", "--attn s2 or sf", a.attn != "full")):
        if not ok and typed(flag, argv):  # accepted and ignored, it would hide a mistake
            raise UsageError(f"{flag} applies to {needs} only")
    if a.offload_activations and a.no_grad_ckpt:
        raise UsageError("--offload-activations moves the checkpointed block inputs; it needs checkpointing (drop --no-grad-ckpt)")
    # The attention groups must tile the sequence.
    if a.attn != "full":
        try:
            g = resolve_group_size(a.attn, a.ctx, a.group_size)
        except ValueError as e:
            raise UsageError(f"--ctx {a.ctx} / --group-size: {e}") from None
        if a.ctx % g:
            raise UsageError(f"--ctx {a.ctx} is not a multiple of the {a.attn} group size {g}"
                             + (" (ctx/4 rounded to even; use a ctx divisible by 8)" if a.group_size is None else ""))
    elif a.group_size is not None:
        raise UsageError("--group-size applies to --attn s2/sf, not full")
    sft_groups = a.sft and a.attn != "full" and a.group_size is None  # chosen per micro-batch by --sft-group-size
    if (a.sft_group_size and not sft_groups) or (a.sft_group_size == "official" and a.shift_wrap):
        raise UsageError("--sft-group-size applies to --sft with --attn s2/sf and no --group-size" if not sft_groups else
                         "--sft-group-size official can exceed a batch, which --shift-wrap's roll cannot; use quarter")
    if a.sft and a.ctx % pad_multiple(a):
        raise UsageError(f"--sft pads to multiples of {pad_multiple(a)}; --ctx {a.ctx} must be one too")
    if a.estimate:
        return
    if not a.out:
        raise UsageError("--out is required")
    if not a.data:
        raise UsageError("--data is required")
    for path in a.data + (a.eval_data or []):
        if not os.path.exists(path):
            raise UsageError(f"--data {path}: no such file or directory")
    if a.model and not os.path.isdir(a.model):
        raise UsageError(f"--model {a.model}: no such directory")
    if a.tokenizer and not os.path.exists(a.tokenizer):
        raise UsageError(f"--tokenizer {a.tokenizer}: no such file or directory")
    if (a.preset or a.from_scratch) and not a.tokenizer:
        raise UsageError(f"--{'preset' if a.preset else 'from-scratch'} needs --tokenizer (a random model comes without one)")
    if a.model and not a.tokenizer and not find_tokenizer(a.model):
        raise UsageError(f"no tokenizer (tokenizer.json or tokenizer.model) next to --model {a.model}; pass --tokenizer PATH")
    inputs = [(f"--{f.replace('_', '-')}", p) for f in ("model", "tokenizer", "data", "eval_data")
              for p in ([getattr(a, f)] if isinstance(getattr(a, f), str) else getattr(a, f) or [])]
    if a.overwrite and a.resume:
        raise UsageError("--resume continues a run, --overwrite deletes it first: give one of them")
    run = is_run(a.out)  # continued with --resume (find_start refuses it otherwise)
    check_output(a.out, "--out", is_dir=True, inputs=inputs, ours=["metrics.jsonl", "tokens"] if run else ["metrics.jsonl"],
                 overwrite=a.overwrite, grows=run)
    if a.token_cache:  # a cache holds the token files of many runs: one with our token files (or their locks) is ours
        tc = a.token_cache
        check_output(tc, "--token-cache", is_dir=True, inputs=inputs, grows=True,
                     ours=[n for n in os.listdir(tc) if n.endswith((".bin.json", ".bin.lock"))] if os.path.isdir(tc) else [])


RESULT_CONFIGS = (ADAPTER_CONFIG, *MODEL_CONFIGS)  # without these, no result loads


def is_run(path):
    """A training run's folder: rank 0 writes metrics.jsonl first. On another machine, which may not share rank 0's
    disk, the folder holds only that machine's token cache (OUT/tokens, with its .bin.json sidecars)."""
    if os.path.exists(os.path.join(path, "metrics.jsonl")):
        return True
    tokens = os.path.join(path, "tokens")
    return (os.path.isdir(tokens) and set(os.listdir(path)) <= {"tokens", STAMP}
            and any(n.endswith(".bin.json") for n in os.listdir(tokens)))


def has_result(run_dir):
    return any(os.path.exists(os.path.join(run_dir, n)) for n in RESULT_CONFIGS)


def claim_run(a):
    """Rank 0, first: --out for this command alone (output.lock_output, released when train.py ends), marked as a
    training run; with --overwrite, the earlier one first leaves its place (output.set_aside)."""
    if a.overwrite:
        set_aside(a.out, "--out")
    lock = lock_output(a.out, "--out")
    open(os.path.join(a.out, "metrics.jsonl"), "a").close()
    return lock


def find_start(a, model, config):
    """(checkpoint, step, its files) to resume from, or (None, 0, None) for a fresh run. Rank 0 only: other machines
    may not see the disk."""
    if not a.resume:
        if checkpoint_dirs(a.out) or has_result(a.out):
            raise UsageError(f"--out {a.out} holds an earlier run{' and its result' if has_result(a.out) else ''}; add "
                             f"--resume {a.out} to continue it, --overwrite to start afresh, or choose another --out")
        return None, 0, None
    ckpt, state, files = find_resumable(a.resume, model, config, lambda msg: print(msg, file=sys.stderr))
    if state["step"] >= a.steps:
        raise UsageError(f"--resume {ckpt}: the checkpoint is at step {state['step']}, nothing left to do for --steps {a.steps}")
    return ckpt, state["step"], files


# ----------------------------------------------------------------------------------------------------
# Data: tokenized once per machine (longlora/data.py), split into training and held-out windows


def load_data(a, tokenizer, local_rank, distributed, wait_group=None):
    """(train split, held-out split or None). The local rank 0 of each machine tokenizes; the others wait, in
    `wait_group`'s collective, whose timeout allows for hours of tokenization."""
    cache = a.token_cache or os.path.join(a.out, "tokens")
    kind = f"sft-{a.sft_template}" if a.sft else "text"

    def prepare(paths):
        key = hashlib.sha256(json.dumps([sorted(map(os.path.abspath, paths)), kind]).encode()).hexdigest()[:16]
        path = os.path.join(cache, f"{kind}-{key}.bin")

        def run():
            os.makedirs(cache, exist_ok=True)
            prepare_sft(paths, tokenizer, path, a.sft_template) if a.sft else prepare_tokens(paths, tokenizer, path)

        on_some_ranks(run, local_rank == 0, distributed, wait_group)  # one tokenizer per machine; the others wait
        if a.sft:
            return open_tokens(path), np.load(path + ".index.npy")
        return open_tokens(path), None

    def make(tokens, index, ids=None):
        if a.sft:
            return SFTData(tokens, index, a.ctx, pad_multiple(a), tokenizer.eos_id, ids)
        return PackedData(tokens, a.ctx, ids)

    tokens, index = prepare(a.data)
    if a.sft:
        keep = np.flatnonzero(index[:, 1] < np.minimum(index[:, 2], a.ctx + 1))  # at least one answer token fits
        if len(keep) == 0:
            raise UsageError(f"empty dataset: no example of {', '.join(a.data)} has answer tokens within --ctx {a.ctx}")
        if len(keep) < len(index) and local_rank == 0:
            print(f"note: {len(index) - len(keep)} of {len(index)} SFT examples are left out: their prompt fills --ctx "
                  f"{a.ctx} (no answer token to learn); a larger --ctx keeps them", file=sys.stderr, flush=True)
        n = len(keep)
    else:
        n = (len(tokens) - 1) // a.ctx
        if n == 0:
            raise UsageError(f"{', '.join(a.data)}: {len(tokens)} tokens, fewer than one sequence of --ctx {a.ctx} + 1")
        keep = np.arange(n)
    if a.eval_data:
        e_tokens, e_index = prepare(a.eval_data)
        held = make(e_tokens, e_index)
        if len(held) == 0:
            raise UsageError(f"--eval-data: fewer tokens than one sequence of --ctx {a.ctx} + 1")
        return make(tokens, index, keep), held
    train_ids, held_ids = split_heldout(n, a.heldout)
    return make(tokens, index, keep[train_ids]), (make(tokens, index, keep[held_ids]) if len(held_ids) else None)


# ----------------------------------------------------------------------------------------------------
# Logging, stopping


def log0(rank, msg):
    if rank == 0:
        print(msg, flush=True)


def log_metrics(path, rank, record):
    if rank == 0:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")


def exit_process(code):
    """train.py's exit. Under torchrun, leave without the interpreter's shutdown (the process group is destroyed,
    every file written). gloo's C++ threads outlive main() and free their finished collectives (Python tensors: they
    take the GIL) a moment after wait() returns; during shutdown Python 3.11 ends such a thread with pthread_exit,
    which unwinds through a C++ destructor: std::terminate aborts a rank whose run succeeded (exit -6, ~1 in 30 runs
    on 2 CPU ranks). os._exit skips that shutdown; nothing needs it."""
    if "WORLD_SIZE" in os.environ:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def reset_peak_memory(device):
    """Count the peak from here on (after loading): CUDA's statistics, or the process's peak RSS (Linux's VmHWM)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    elif os.path.exists("/proc/self/clear_refs"):
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # 5: reset the peak resident set size
        except OSError:  # some sandboxes forbid it: the peak then includes loading
            pass


def attention_backend(device, bf16) -> str:
    """For the log: what attention's backend "auto" runs in training, and when it is not flash-attn, why not."""
    why_not = flash_varlen()[1]
    if device.type != "cuda" or not bf16:
        why_not = f"it runs on CUDA in bf16; this run is {'bf16' if bf16 else 'fp32'} on {device.type}"
    return "flash-attn 2" if why_not is None else f"PyTorch SDPA (not flash-attn: {why_not})"


def peak_memory_gb(device):
    """(peak GB, what it counts). On CUDA the peak allocated by tensors, and what the caching allocator reserved
    (allocated plus cached blocks: what the GPU sees used, which out-of-memory errors count)."""
    if device.type == "cuda":
        return (torch.cuda.max_memory_allocated(device) / 1e9,
                f"cuda max allocated; {torch.cuda.max_memory_reserved(device) / 1e9:.2f} GB reserved")
    if os.path.exists("/proc/self/status"):
        with open("/proc/self/status") as f:
            kb = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
        return kb / 1e6, "max rss"
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, "max rss"  # Linux reports kilobytes


def fmt_time(s):
    s = int(s)
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def trajectory_config(a, world):
    """The arguments that decide the numbers a run computes; a resumed run must agree on all of them."""
    keys = ["model", "preset", "from_scratch", "data", "eval_data", "sft", "ctx", "attn", "group_size", "sink_tokens",
            "shift_wrap", "lora_r", "lora_alpha", "lora_dropout", "lora_targets", "no_train_embed", "no_train_norms",
            "lr", "warmup", "schedule", "min_lr_ratio", "weight_decay", "beta2", "grad_clip", "seed", "heldout", "dtype"]
    keys += (["full"] if a.full else []) + (["sft_template"] if a.sft else [])  # (older runs lack them)
    if a.schedule == "cosine":
        keys.append("steps")  # the cosine's length; a constant schedule may be extended by a larger --steps
    cfg = {k: comparable(k, getattr(a, k)) for k in keys}  # (paths as real paths)
    if a.sft:
        cfg["sft_group_size"] = sft_group_rule(a)
    cfg["global_batch"] = a.batch_size * a.grad_accum * world  # the number of ranks itself may change
    return cfg


class StopSignals:
    """While training: Ctrl-C (SIGINT) or SIGTERM (a preempted job) is remembered, and the loop acts on it at the end
    of the step: it saves a checkpoint and returns 130 / 143, as the shell reports these signals. The same signal
    again stops at once. (Under torchrun, Ctrl-C reaches every rank, then torchrun sends SIGTERM: not "again".)"""

    def __enter__(self):
        self.signum = None
        self.old = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def handle(self, signum, frame):
        if self.signum == signum:
            raise KeyboardInterrupt
        if self.signum is not None:
            return
        self.signum = signum
        print(f"{signal.Signals(signum).name}: stopping after this step (again: at once)", file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        for s, handler in self.old.items():
            signal.signal(s, handler)


# ----------------------------------------------------------------------------------------------------
# The result


def write_result(a, model, tensors, base_fingerprint, save_dtype, tokenizer_path, bf16):
    """Rank 0, at the end: an adapter (LoRA), or a whole model in the base's layout (--full, --from-scratch) in the
    base's dtype, with the RoPE scaling and the new context in its config. tensors: every trainable tensor, whole.

    The run folder also holds checkpoints and metrics, and a resumed run may replace an earlier result: the result is
    built in a folder inside, then moved in by output.install_files, configs last."""
    for old in glob.glob(os.path.join(glob.escape(a.out), ".result.partial-*")):  # of a run killed here (we hold the lock)
        shutil.rmtree(old)
    tmp = os.path.join(a.out, f".result.partial-{os.getpid()}")
    os.makedirs(tmp)
    if a.full or a.from_scratch:
        args = result_args(model)
        if args.tie_embeddings:
            tensors["output.weight"] = tensors["tok_embeddings.weight"]
        layout = checkpoint_layout(a.model) if a.model else "own"
        write_model(args, {k: v.to(save_dtype) for k, v in tensors.items()}, tmp, layout, tokenizer_path)
    else:
        train_args = {k: v for k, v in vars(a).items() if isinstance(v, (int, float, str, list, type(None)))}
        train_args.update(sft_group_size=sft_group_rule(a), pad_multiple=pad_multiple(a), bf16=bf16)  # as trained
        save_adapter(adapter_model(model, tensors), tmp, ctx=a.ctx, fingerprint=base_fingerprint,
                     extra={"train_args": train_args})
    install_files(tmp, a.out, RESULT_CONFIGS, (*MODEL_FILES, ADAPTER_WEIGHTS))
    os.rmdir(tmp)


def result_args(model):
    """The trained model's ModelArgs as the result is used: full attention."""
    return ModelArgs(**{**asdict(model.args), "attn": "full", "group_size": None})


def adapter_model(model, tensors):
    """The model an adapter is saved from: a copy of `model` on the meta device (its frozen tensors are never read)
    holding the trained tensors `tensors` ({name: whole tensor})."""
    args = result_args(model)
    with torch.device("meta"):
        shadow = Transformer(args)
    cfg = model.lora_config
    apply_lora(shadow, r=cfg["r"], alpha=cfg["alpha"], dropout=cfg["dropout"], targets=cfg["targets"])
    mark_trainable(shadow, embed=cfg["embed"], norms=cfg["norms"])
    shadow.load_state_dict(tensors, strict=False, assign=True)
    if args.tie_embeddings:  # assign=True replaced the shared parameter: tie it again
        shadow.output.weight = shadow.tok_embeddings.weight
    return shadow


def check_result(a, model):
    """Before any training: the result can be written. For LoRA, the adapter is built as write_result builds it,
    from stand-ins of the trained tensors, and it must store every tensor that trains; a whole model's layout must
    be able to state its RoPE and biases."""
    if a.full or a.from_scratch:  # a whole model in the base's layout, which must be able to state it
        check_exportable(result_args(model), checkpoint_layout(a.model) if a.model else "own")
    else:
        stand_ins = {n: torch.empty(p.shape, device="meta") for n, p in model.named_parameters() if p.requires_grad}
        check_storable(adapter_model(model, stand_ins))
