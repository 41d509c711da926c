"""
Long-context fine-tuning of LLaMA2 (LongLoRA / SinkLoRA): one file, one GPU or many, or a laptop CPU.

What a training run does, in order (and the order of this file: arguments, data, model, FSDP, the loop,
the result):

    text / JSONL ──tokenize once──► tokens.bin (memory-mapped, uint16/uint32) + tokens.bin.json    (data.py)
                                        │ cut into windows of ctx+1 tokens, a few held out
                                        ▼
    base model (bf16, frozen) ──► RoPE interpolation: positions / ceil(ctx / original context)
                              ──► LoRA r=8 α=16 on wq wk wv wo, + embeddings and norms train (fp32)
                              ──► S²-Attn (or SF-Attn) while training, full attention for evaluation
                              ──► FSDP2: fully_shard(every block, the embeddings, the output), then
                                  fully_shard(model), all on the meta device; then each rank reads only its
                                  own shard of the weights (shard.py)
                                        │ AdamW, warmup then constant (or cosine), grad clip 1
                                        ▼
    out/metrics.jsonl, out/checkpoints/step-NNNNNN/ (resumable; checkpoint.py), and the result:
    out/adapter.safetensors + out/adapter_config.json (lora.py's format; sample.py and `lora.py merge` load it)
    --full: every parameter trains (fp32 masters), no LoRA; the result is the whole model in --model's layout
    and dtype, with the RoPE scaling and the new context in its config (export.write_model)

Defaults are LongLoRA's recipe: S²-Attn with groups of ctx/4 (--sft: its SFT rule, see data.py), LoRA r=8
α=16 on the attention projections with trainable embeddings and norms, AdamW lr 2e-5 (betas 0.9/0.999,
weight decay 0), 20 warmup steps then constant, batch 1 per device, gradient accumulation 8, 1000 steps,
grad clip 1.0, bf16 on GPU, activation checkpointing on. --ctx sets the RoPE interpolation factor to
ceil(ctx / the base's original context).

Launch:

    # one process (a GPU if there is one, else the CPU)
    python train.py --model llama-2-7b --data pg19/train --ctx 8192 --out out/7b-8k
    # one machine, 8 GPUs: each rank holds 1/8 of the weights (FSDP), reads 1/8 of each batch
    torchrun --standalone --nproc_per_node=8 train.py --model llama-2-7b --data redpajama.jsonl --ctx 32768 --out out/7b-32k
    # several machines (run on each; the same flags everywhere)
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 train.py --model ... --out ...
    # continue a run that stopped (same flags, plus --resume; the losses continue exactly)
    torchrun --standalone --nproc_per_node=8 train.py --model llama-2-7b ... --out out/7b-32k --resume out/7b-32k
    # supervised fine-tuning on instruction data as LongAlpaca (templates, groups and loss weighting: data.py)
    python train.py --sft --sft-template longalpaca --model 7b-32k-merged --data LongAlpaca-12k.json --ctx 32768 --out sft
    # full fine-tuning: every parameter trains; writes a whole model in the base's layout
    torchrun --standalone --nproc_per_node=8 train.py --full --model llama-2-7b-hf --data redpajama.jsonl --ctx 8192 --out 7b-full
    # pre-train a small model from scratch (full parameters, no LoRA; the CPU demo does this)
    python train.py --from-scratch demo --tokenizer tok.model --data corpus/ --ctx 256 --lr 2e-3 --out out/base
    # memory and FLOPs of a run, without loading any weights (estimate.py)
    python train.py --estimate --preset llama2-7b --ctx 32768 --gpus 8

Decisions a reader should know about (packing, the held-out split and the sample order are in data.py;
what a checkpoint holds and why a kill cannot break it, in checkpoint.py):
  * The loss of a step is the mean over all target tokens of the global batch (all micro-batches of all
    ranks), not a mean of per-micro-batch means as in LongLoRA's HF Trainer scripts; so SFT batches with
    few answer tokens weigh less, and the result does not depend on how the batch is split across ranks.
  * Mixed precision (GPU): the frozen base stays bf16; the trainable tensors (LoRA, embeddings, norms; all
    of them with --full) are fp32 and are what AdamW sees, so optimizer state exists only for them (140M
    numbers of LLaMA2-7B with LoRA+, not 6.7B). FSDP2 computes in bf16 (MixedPrecisionPolicy(param_dtype=
    bf16, reduce_dtype=fp32)): its one requirement, a single dtype over the *trainable* parameters of each
    fully_shard group, holds because all of them are fp32. A single process uses torch.autocast(bf16).
  * Logging: rank 0 prints each step's loss, lr, tokens/s, time, peak memory (CUDA max allocated, or max RSS)
    and ETA, and appends them to out/metrics.jsonl, with the held-out losses (full attention).
"""

import hashlib
import json
import math
import os
import signal
import sys
import time
from contextlib import ExitStack, nullcontext
from dataclasses import asdict

import numpy as np
import torch
import torch.distributed as dist

from attention import resolve_group_size
from cli import Parser, UsageError, check_output, entry, lock_output
from checkpoint import checkpoint_dirs, find_checkpoint, find_resumable, full_trainable_state, load_checkpoint, save_checkpoint
from data import (SFT_TEMPLATES, PackedData, SFTData, longlora_sft_group_size, open_tokens, prepare_sft, prepare_tokens,
                  sample_positions, split_heldout)
from estimate import run_estimate
from export import write_model
from lora import DEFAULT_TARGETS, TARGETS, apply_lora, base_fingerprint, mark_trainable, save_adapter, trainable_summary
from model import PRESETS, ModelArgs, Tokenizer, Transformer, check_tokenizer_fits, find_tokenizer, preset, write_text
from shard import all_sum, broadcast0, load_weights, lora_init_values, on_some_ranks, setup_distributed, shard_model
from weights import checkpoint_layout, read_checkpoint


# ----------------------------------------------------------------------------------------------------
# Arguments


def build_parser():
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
    src.add_argument("--tokenizer", help="sentencepiece tokenizer.model (default: the one next to --model)")
    d = p.add_argument_group("data")
    d.add_argument("--data", nargs="+", help="(required, except with --estimate) training text: files, folders (all "
                   "files inside) or JSONL/JSON with a 'text' field; with --sft, JSON/JSONL records {instruction, input?, output}")
    d.add_argument("--sft", action="store_true", help="supervised fine-tuning: instruction records, loss on answers only")
    d.add_argument("--sft-template", choices=SFT_TEMPLATES, default="llama2", help="--sft prompt format: LLaMA2-chat's "
                   "[INST] turn (as sample.py --chat), or LongAlpaca's exact one (LongLoRA's supervised-fine-tune.py)")
    d.add_argument("--sft-group-size", choices=("official", "quarter"), help="--sft groups: LongLoRA's SFT rule (default; "
                   "see data.py) or T/4 of the padded batch (the default with --shift-wrap, as LongLoRA's non-flash path)")
    d.add_argument("--ctx", type=int, default=8192, help="training sequence length; sets the RoPE interpolation factor "
                   "ceil(ctx / the model's original context)")
    d.add_argument("--heldout", type=float, default=0.01, help="fraction of sequences held out for evaluation (evenly spread)")
    d.add_argument("--eval-data", nargs="+", help="separate held-out data (then nothing of --data is held out)")
    d.add_argument("--token-cache", help="folder for the tokenized data, reused across runs (default: OUT/tokens)")
    at = p.add_argument_group("attention")
    at.add_argument("--attn", choices=("full", "s2", "sf"), default="s2",
                    help="training attention: full, S²-Attn (LongLoRA) or SF-Attn (SinkLoRA); evaluation uses full")
    at.add_argument("--group-size", type=int, help="S²/SF group size (default ctx/4, LongLoRA's ratio)")
    at.add_argument("--sink-tokens", type=int, default=4, help="SF-Attn: leading tokens every query sees")
    at.add_argument("--shift-wrap", action="store_true", help="S²: the paper's cyclic roll (leaks future tokens; ablation only)")
    lo = p.add_argument_group("LoRA (not with --from-scratch or --full)")
    lo.add_argument("--lora-r", type=int, help="LoRA rank (default 8)")
    lo.add_argument("--lora-alpha", type=float, help="LoRA alpha; the update is scaled by alpha/r (default 16)")
    lo.add_argument("--lora-dropout", type=float, help="dropout on the LoRA input (default 0)")
    lo.add_argument("--lora-targets", nargs="+", choices=TARGETS, help="layers that get LoRA (default wq wk wv wo)")
    lo.add_argument("--no-train-embed", action="store_true", help="freeze tok_embeddings (LongLoRA trains them)")
    lo.add_argument("--no-train-norms", action="store_true", help="freeze the RMSNorm weights (LongLoRA trains them)")
    o = p.add_argument_group("optimisation")
    o.add_argument("--steps", type=int, default=1000, help="optimizer steps")
    o.add_argument("--batch-size", type=int, default=1, help="sequences per micro-batch per process")
    o.add_argument("--grad-accum", type=int, default=8, help="micro-batches per optimizer step")
    o.add_argument("--lr", type=float, default=2e-5, help="peak learning rate (AdamW)")
    o.add_argument("--warmup", type=int, default=20, help="linear warmup steps")
    o.add_argument("--schedule", choices=("constant", "cosine"), default="constant", help="after warmup")
    o.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine: final lr = lr x this")
    o.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (matrices only, not norms)")
    o.add_argument("--beta2", type=float, default=0.999, help="AdamW beta2 (beta1 is 0.9)")
    o.add_argument("--grad-clip", type=float, default=1.0, help="clip the global gradient norm (0: off)")
    o.add_argument("--seed", type=int, default=0, help="seed of the LoRA/model init and the data order")
    o.add_argument("--dtype", choices=("auto", "bf16", "fp32"), default="auto",
                   help="compute dtype: auto = bf16 on GPU (frozen weights bf16, trainable fp32), fp32 on CPU")
    o.add_argument("--no-grad-ckpt", action="store_true", help="keep all activations instead of recomputing blocks in backward")
    o.add_argument("--offload-activations", action="store_true", help="keep the checkpointed block inputs in (pinned) "
                   "host memory until backward needs them: GPU memory for contexts that do not fit otherwise")
    r = p.add_argument_group("output")
    r.add_argument("--out", help="(required, except with --estimate) output folder: metrics.jsonl, checkpoints/, and "
                   "the final adapter or model")
    r.add_argument("--save-every", type=int, default=100, help="checkpoint every N steps (and at the end)")
    r.add_argument("--keep", type=int, default=2, help="checkpoints to keep")
    r.add_argument("--resume", metavar="DIR", help="continue from a checkpoint, or from the newest one of a run folder")
    r.add_argument("--eval-every", type=int, default=0, help="held-out loss every N steps and before training (0: at the end only)")
    r.add_argument("--eval-samples", type=int, default=32, help="held-out sequences per evaluation")
    r.add_argument("--log-every", type=int, default=1, help="print every N steps (metrics.jsonl gets every step)")
    e = p.add_argument_group("estimate")
    e.add_argument("--estimate", action="store_true", help="print per-GPU memory and FLOPs per step for --preset/--model, "
                   "--ctx, --attn, --gpus, --batch-size, --grad-accum, then exit (no weights are loaded)")
    e.add_argument("--gpus", type=int, default=8, help="--estimate: number of GPUs")
    return p


def check_args(a):
    """Catch a user's mistakes before any work; every message names the flag."""
    sources = [s for s in ("model", "preset", "from_scratch") if getattr(a, s)]
    if len(sources) != 1:
        raise UsageError("give exactly one of --model, --preset, --from-scratch" + (f" (got {', '.join('--' + s.replace('_', '-') for s in sources)})" if sources else ""))
    lora_flags = [f for f in ("lora_r", "lora_alpha", "lora_dropout", "lora_targets") if getattr(a, f) is not None]
    if a.full and a.from_scratch:
        raise UsageError("--full fine-tunes --model or --preset; --from-scratch already trains every parameter")
    if (a.from_scratch or a.full) and (lora_flags or a.no_train_embed or a.no_train_norms):
        raise UsageError(f"--{'full' if a.full else 'from-scratch'} trains every parameter; "
                         f"--{(lora_flags or ['no_train_embed'])[0].replace('_', '-')} does not apply")
    for flag, default in (("lora_r", 8), ("lora_alpha", 16.0), ("lora_dropout", 0.0), ("lora_targets", list(DEFAULT_TARGETS))):
        setattr(a, flag, default if getattr(a, flag) is None else getattr(a, flag))
    for flag in ("ctx", "steps", "batch_size", "grad_accum", "save_every", "keep", "log_every", "gpus", "lora_r"):
        if getattr(a, flag) < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(a, flag)}")
    for flag in ("warmup", "eval_every", "eval_samples", "weight_decay", "grad_clip", "sink_tokens"):
        if getattr(a, flag) < 0:
            raise UsageError(f"--{flag.replace('_', '-')} must be >= 0, got {getattr(a, flag)}")
    if a.offload_activations and a.no_grad_ckpt:
        raise UsageError("--offload-activations moves the checkpointed block inputs; it needs checkpointing (drop --no-grad-ckpt)")
    if not 0 < a.lr < math.inf:
        raise UsageError(f"--lr must be a finite number > 0, got {a.lr}")
    if not 0 <= a.heldout < 1:
        raise UsageError(f"--heldout must be in [0, 1), got {a.heldout}")
    if not 0 <= a.min_lr_ratio <= 1:
        raise UsageError(f"--min-lr-ratio must be in [0, 1], got {a.min_lr_ratio}")
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
    a.sft_group_size = (a.sft_group_size or ("quarter" if a.shift_wrap else "official")) if sft_groups else None
    # SFT pads each batch to a multiple of this, so that a padded length is also tiled by the groups.
    a.pad_multiple = a.group_size if (a.attn != "full" and a.group_size) else 8
    if a.sft and a.ctx % a.pad_multiple:
        raise UsageError(f"--sft pads to multiples of {a.pad_multiple}; --ctx {a.ctx} must be one too")
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
    if a.tokenizer and not os.path.isfile(a.tokenizer):
        raise UsageError(f"--tokenizer {a.tokenizer}: no such file")
    if (a.preset or a.from_scratch) and not a.tokenizer:
        raise UsageError(f"--{'preset' if a.preset else 'from-scratch'} needs --tokenizer (a random model comes without one)")
    inputs = [(f"--{f.replace('_', '-')}", p) for f in ("model", "tokenizer", "data", "eval_data")
              for p in ([getattr(a, f)] if isinstance(getattr(a, f), str) else getattr(a, f) or [])]
    check_output(a.out, "--out", is_dir=True, inputs=inputs, ours=["metrics.jsonl"])  # (runs from before the stamp)
    if a.token_cache:  # a cache holds the token files of many runs: one with our token files is ours
        tc = a.token_cache
        check_output(tc, "--token-cache", is_dir=True, inputs=inputs,
                     ours=[n for n in os.listdir(tc) if n.endswith(".bin.json")] if os.path.isdir(tc) else [])


# ----------------------------------------------------------------------------------------------------
# Data: tokenized once per machine (data.py), split into training and held-out windows


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
            return SFTData(tokens, index, a.ctx, a.pad_multiple, tokenizer.eos_id, ids)
        return PackedData(tokens, a.ctx, ids)

    tokens, index = prepare(a.data)
    if a.sft:
        keep = np.flatnonzero(index[:, 1] < np.minimum(index[:, 2], a.ctx + 1))  # at least one answer token fits
        if len(keep) == 0:
            raise UsageError(f"empty dataset: no example of {', '.join(a.data)} has answer tokens within --ctx {a.ctx}")
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
# Model: LLaMA2 with position interpolation, LoRA (or all parameters) trainable


def build_model(a, tokenizer, device, distributed, checkpoint):
    """The model with LoRA (or all parameters) trainable, trainable tensors fp32, frozen ones in the compute dtype.
    A --model (`checkpoint`: read_checkpoint's (args, weights)) is built on the meta device, sharded, and then
    filled: each rank reads only its shard (shard.py)."""
    frozen_dtype = torch.bfloat16 if a.bf16 else torch.float32
    torch.manual_seed(a.seed)  # the same random init (and LoRA init) on every rank
    weights = None
    if a.from_scratch:
        model = Transformer(preset(a.from_scratch, vocab_size=tokenizer.vocab_size, max_seq_len=a.ctx))
    elif a.preset:
        model = Transformer(preset(a.preset, vocab_size=tokenizer.vocab_size))
    else:
        args, weights = checkpoint
        with torch.device("meta"):
            model = Transformer(args)
    # recorded in the adapter, which then loads on this base only (a --model's: read below, once it is checked)
    a.base_fingerprint = base_fingerprint(model.state_dict().__getitem__, model.args.n_layers) if weights is None else None
    # --full writes its result in the checkpoint's own dtype (every tensor trains in fp32 below)
    a.save_dtype = weights.specs["tok_embeddings.weight"].dtype if weights is not None else torch.float32
    args = model.args
    on_some_ranks(lambda: check_tokenizer_fits(tokenizer, args.vocab_size), True, distributed)  # one verdict, one line
    if not a.from_scratch and a.ctx > args.max_seq_len:
        # Position interpolation (LongLoRA): squeeze ctx positions into the range the model was trained on.
        args.extend_context(a.ctx)
    args.attn, args.group_size, args.sink_tokens, args.shift_wrap = a.attn, a.group_size, a.sink_tokens, a.shift_wrap
    if a.from_scratch or a.full:
        model.requires_grad_(True)
    else:
        apply_lora(model, r=a.lora_r, alpha=a.lora_alpha, dropout=a.lora_dropout, targets=a.lora_targets)
        mark_trainable(model, embed=not a.no_train_embed, norms=not a.no_train_norms)
    lora_init = lora_init_values(model) if weights is not None else {}  # drawn now: the seed's next numbers
    for p in model.parameters():  # on meta this only records the dtype the checkpoint's tensors are converted to
        p.data = p.data.float() if p.requires_grad else p.data.to(frozen_dtype)
    model.gradient_checkpointing = not a.no_grad_ckpt
    model.offload_activations = a.offload_activations
    if distributed:
        shard_model(model, device, a.bf16)
    if weights is not None:
        on_some_ranks(lambda: load_weights(model, weights, device, lora_init, a.model), True, distributed)
        a.base_fingerprint = base_fingerprint(lambda name: weights.read([name])[name], args.n_layers)  # a tensor at a time
    elif not distributed:
        model.to(device)
    return model


# ----------------------------------------------------------------------------------------------------
# The loop


def lr_at(step, a):
    """Learning rate of optimizer step `step` (1-based): linear warmup, then constant or cosine to lr*min_lr_ratio."""
    if a.warmup and step <= a.warmup:
        return a.lr * step / a.warmup
    if a.schedule == "constant":
        return a.lr
    progress = (step - a.warmup) / max(1, a.steps - a.warmup)  # 0 right after warmup, 1 at the last step
    floor = a.lr * a.min_lr_ratio
    return floor + (a.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def token_loss_sum(model, x, y, lengths, autocast):
    """Sum of the cross-entropy over the target tokens (y != -100) of one micro-batch (fp32), computed by
    the model chunk by chunk, without (B, T, V) logits."""
    with autocast:
        return model(x, y, lengths=lengths, reduction="sum")


@torch.no_grad()
def evaluate(model, data, a, rank, world, device, distributed, autocast):
    """Mean held-out loss over the first --eval-samples sequences, with full attention (as the model is used).
    Every rank runs the same number of forwards (FSDP all-gathers inside each), padding with empty batches."""
    n = min(len(data), a.eval_samples)
    per_round = a.batch_size * world
    rounds = -(-n // per_round)
    model.eval()
    mode, model.args.attn = model.args.attn, "full"
    total, count = 0.0, 0.0
    try:
        for r in range(rounds):
            pos = [p for p in range(r * per_round + rank * a.batch_size, r * per_round + (rank + 1) * a.batch_size) if p < n]
            x, y, lengths = data.batch(pos or [0])
            if not pos:
                y = torch.full_like(y, -100)  # a stand-in batch: runs the collectives, adds nothing
            total += token_loss_sum(model, x.to(device), y.to(device), lengths, autocast).item()
            count += (y != -100).sum().item()
    finally:
        model.args.attn = mode
        model.train()
        if distributed:
            # FSDP2 reshards the root group (the final norm; tied embeddings) after backward only; a forward
            # without backward leaves it unsharded, and the next checkpoint would then save bf16 compute
            # copies and fail to match the optimizer's parameters. Reshard explicitly.
            model.reshard()
    total, count = all_sum([total, count], device, distributed)
    return total / max(count, 1)


def log0(rank, msg):
    if rank == 0:
        print(msg, flush=True)


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


def peak_memory_gb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9, "cuda max allocated"
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
    keys += (["full"] if a.full else []) + (["sft_template", "sft_group_size"] if a.sft else [])  # (older runs lack them)
    if a.schedule == "cosine":
        keys.append("steps")  # the cosine's length; a constant schedule may be extended by a larger --steps
    cfg = {k: getattr(a, k) for k in keys}
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


def train(a, stop, held):
    rank, local_rank, world, device, distributed, wait_group = setup_distributed()
    # One run per --out at a time (rank 0 holds the lock until train.py ends; every rank learns if it is taken).
    held.enter_context(on_some_ranks(lambda: lock_output(a.out, "--out"), rank == 0, distributed) or nullcontext())
    if a.resume:  # only rank 0 reads it (other machines may not see the disk): checked there now, the rest below
        on_some_ranks(lambda: find_checkpoint(a.resume), rank == 0, distributed)
    a.bf16 = a.dtype == "bf16" or (a.dtype == "auto" and device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if a.bf16 and not distributed else nullcontext()

    # -- tokenizer, data, model
    tok_path = a.tokenizer or (find_tokenizer(a.model) if a.model else None)
    if not tok_path:
        raise UsageError(f"no tokenizer.model next to --model {a.model}; pass --tokenizer PATH")
    tokenizer = Tokenizer(tok_path)
    # --model's config and tensor index (no weights yet), before the data: a broken checkpoint is reported at
    # once, not after a tokenization that can take an hour
    checkpoint = on_some_ranks(lambda: read_checkpoint(a.model), True, distributed) if a.model else None
    train_data, held_data = load_data(a, tokenizer, local_rank, distributed, wait_group)
    model = build_model(a, tokenizer, device, distributed, checkpoint)
    reset_peak_memory(device)
    log0(rank, f"model: {model.num_params() / 1e6:.2f}M parameters, ctx {a.ctx}, rope scaling {model.args.rope_scaling:g}, "
               f"attn {a.attn}, {'bf16' if a.bf16 else 'fp32'}, {world} process(es) on {device.type}" +
               (", FSDP" if distributed else ""))
    log0(rank, f"{'trainable: all parameters' if a.from_scratch or a.full else trainable_summary(model)}; "
               f"data: {len(train_data)} training sequences, {len(held_data) if held_data else 0} held out")

    # -- optimizer: only trainable tensors, so AdamW keeps fp32 state for nothing else; no decay on norms
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for _, p in params if p.ndim >= 2], "weight_decay": a.weight_decay},
              {"params": [p for _, p in params if p.ndim < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=a.lr, betas=(0.9, a.beta2), eps=1e-8)
    trainable = [p for _, p in params]

    # -- resume
    config = trajectory_config(a, world)
    torch.manual_seed(a.seed + 1 + rank)  # each rank its own stream (LoRA dropout); a resume restores them

    def find_resume():  # rank 0 alone reads the disk: other machines may not see it
        if not a.resume:
            if checkpoint_dirs(a.out):
                raise UsageError(f"--out {a.out} already holds checkpoints; add --resume {a.out} to continue, "
                                 "or choose another --out")
            return None, 0, None
        ckpt, state, files = find_resumable(a.resume, model, config, lambda msg: print(msg, file=sys.stderr))
        if state["step"] >= a.steps:
            raise UsageError(f"--resume {ckpt}: the checkpoint is at step {state['step']}, nothing left to do for --steps {a.steps}")
        return ckpt, state["step"], files

    ckpt, start, files = on_some_ranks(find_resume, rank == 0, distributed) or (None, None, None)
    ckpt, start = broadcast0((ckpt, start), distributed)  # the files stay on rank 0, which broadcasts the tensors
    if ckpt:
        load_checkpoint(files, model, opt, rank, world, distributed)
        log0(rank, f"resumed from {ckpt} at step {start}")

    metrics_path = os.path.join(a.out, "metrics.jsonl")
    if rank == 0:
        os.makedirs(a.out, exist_ok=True)
        old = open(metrics_path).read().splitlines() if os.path.exists(metrics_path) else []
        kept = "".join(line + "\n" for line in old if json.loads(line)["step"] <= start) if a.resume else ""
        write_text(metrics_path, kept)

    def log_metrics(rec):
        if rank == 0:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(rec) + "\n")

    def run_eval(step):
        if held_data is not None and a.eval_samples > 0:
            loss = evaluate(model, held_data, a, rank, world, device, distributed, autocast)
            log0(rank, f"step {step}: held-out loss {loss:.4f} (ppl {math.exp(min(loss, 50)):.2f})")
            log_metrics({"step": step, "heldout_loss": loss})

    def run_state(step):
        return {"step": step, "samples_seen": step * config["global_batch"], "config": config,
                "rope_scaling": model.args.rope_scaling, "max_seq_len": model.args.max_seq_len,
                "base_fingerprint": a.base_fingerprint}  # (lora.read_adapter reads a checkpoint as an adapter)

    # -- the loop
    model.train()
    if a.eval_every and start == 0:
        run_eval(0)
    B, A, G = a.batch_size, a.grad_accum, config["global_batch"]
    times, step = [], start
    for step in range(start + 1, a.steps + 1):
        t0 = time.perf_counter()
        lr = lr_at(step, a)
        for g in opt.param_groups:
            g["lr"] = lr
        # This rank's micro-batches: global sample j = (step-1)*G + m*W*B + rank*B + b.
        first = (step - 1) * G
        micro = [train_data.batch(sample_positions(len(train_data), a.seed, first + m * world * B + rank * B, B))
                 for m in range(A)]
        n_target, n_real = all_sum([sum(float((y != -100).sum()) for _, y, _ in micro),
                                    sum(float(x.numel() if l is None else l.sum()) for x, _, l in micro)], device, distributed)
        loss_sum = torch.zeros((), device=device)
        for m, (x, y, lengths) in enumerate(micro):
            if distributed:  # LoRA: reduce-scatter once per step, after the last micro-batch; every parameter
                # training (--full, --from-scratch): every micro-batch, as a whole fp32 gradient of each would not fit
                model.set_requires_gradient_sync(m == A - 1 or a.full or bool(a.from_scratch))
            if a.sft_group_size == "official":  # LongLoRA's rule, from the longest example (truncated at ctx)
                model.args.group_size = longlora_sft_group_size(min(int(lengths.max()) + 1, a.ctx))
            # lengths stay on the CPU: the model reads them to the host once per forward (no wait for the device)
            ls = token_loss_sum(model, x.to(device), y.to(device), lengths, autocast)
            # FSDP averages gradients over ranks; times `world` makes it the sum, / n_target the global token mean.
            (ls * world / max(n_target, 1)).backward()
            loss_sum += ls.detach()
        loss, stopping = all_sum([loss_sum.item(), float(stop.signum or 0)], device, distributed)  # (every rank agrees)
        loss /= max(n_target, 1)
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, a.grad_clip if a.grad_clip > 0 else float("inf"))
        if not (math.isfinite(loss) and math.isfinite(float(grad_norm))):  # (the same on every rank: all-reduced)
            # Stop before the update: the weights, the checkpoints on disk and the output stay as they were.
            last = checkpoint_dirs(a.out)[-1:]
            raise UsageError(f"step {step}: the loss is {loss:g} and the gradient norm {float(grad_norm):g}: training "
                             f"diverged (try a lower --lr); stopped before this step's update, no result written"
                             + (f", the last checkpoint {last[0]} is kept" if last else ""))
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dt = time.perf_counter() - t0
        times.append(dt)
        eta = sum(times[-20:]) / len(times[-20:]) * (a.steps - step)
        peak, peak_kind = peak_memory_gb(device)
        rec = {"step": step, "loss": loss, "lr": lr, "grad_norm": float(grad_norm), "tokens": int(n_real),
               "tokens_per_s": n_real / dt, "step_time_s": dt, "peak_mem_gb": peak, "eta_s": eta}
        log_metrics(rec)
        if step % a.log_every == 0 or step == a.steps:
            log0(rank, f"step {step}/{a.steps} | loss {loss:.4f} | lr {lr:.2e} | {n_real / dt:,.0f} tok/s | "
                       f"{dt:.2f} s/step | peak {peak:.2f} GB ({peak_kind}) | eta {fmt_time(eta)}")
        if a.eval_every and step % a.eval_every == 0 and step != a.steps:
            run_eval(step)
        if step % a.save_every == 0 or step == a.steps or stopping:
            save_checkpoint(a.out, step, model, opt, run_state(step), a.keep, rank, world)
        if stopping:
            log0(rank, f"stopped at step {step}: checkpoint saved in {a.out}/checkpoints; to continue, run the same "
                       f"command with --resume {a.out}")
            return 128 + (stop.signum or signal.SIGTERM)  # 130 for SIGINT, 143 for SIGTERM (as shells report them)
    run_eval(step)

    # -- the result, written by rank 0: an adapter (LoRA), or a whole model in the base's layout (--full,
    # --from-scratch) in the base's dtype, with the RoPE scaling and the new context in its config
    tensors = full_trainable_state(model, keep=rank == 0)
    if rank == 0:
        args = ModelArgs(**{**asdict(model.args), "attn": "full", "group_size": None})  # how the result is used
        if a.full or a.from_scratch:
            if args.tie_embeddings:
                tensors["output.weight"] = tensors["tok_embeddings.weight"]
            layout = checkpoint_layout(a.model) if a.model else "own"
            write_model(args, {k: v.to(a.save_dtype) for k, v in tensors.items()}, a.out, layout, tok_path)
        else:
            with torch.device("meta"):
                shadow = Transformer(args)
            cfg = model.lora_config
            apply_lora(shadow, r=cfg["r"], alpha=cfg["alpha"], dropout=cfg["dropout"], targets=cfg["targets"])
            mark_trainable(shadow, embed=cfg["embed"], norms=cfg["norms"])
            shadow.load_state_dict(tensors, strict=False, assign=True)  # frozen tensors stay on meta: never read
            save_adapter(shadow, a.out, ctx=a.ctx, fingerprint=a.base_fingerprint, extra={"train_args": {k: v for k, v in vars(a).items()
                                                                         if isinstance(v, (int, float, str, list, type(None)))}})
        log0(rank, f"wrote {'model' if a.full or a.from_scratch else 'adapter'} to {a.out}")
    if distributed:
        dist.barrier()
    return 0


# ----------------------------------------------------------------------------------------------------
# Entry point: a user's mistake is one "error:" line and exit 2, also under torchrun


@entry
def main(argv=None) -> int:
    try:
        a = build_parser().parse_args(argv)
        if a.estimate and not (a.model or a.preset or a.from_scratch):
            a.preset = "llama2-7b"
        check_args(a)
        if a.estimate:
            return run_estimate(a)
        with StopSignals() as stop, ExitStack() as held:
            return train(a, stop, held)
    finally:
        if dist.is_available() and dist.is_initialized() and "WORLD_SIZE" in os.environ:
            dist.destroy_process_group()


if __name__ == "__main__":
    code = main()
    if "WORLD_SIZE" in os.environ:
        # Under torchrun, leave without the interpreter's shutdown (the process group is destroyed, every file
        # written). gloo's C++ threads outlive main() and free their finished collectives (Python tensors: they
        # take the GIL) a moment after wait() returns; during shutdown Python 3.11 ends such a thread with
        # pthread_exit, which unwinds through a C++ destructor: std::terminate aborts a rank whose run
        # succeeded (exit -6, ~1 in 30 runs on 2 CPU ranks). os._exit skips that shutdown; nothing needs it.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
