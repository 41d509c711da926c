"""
Long-context fine-tuning of LLaMA2 (LongLoRA / SinkLoRA): one file, one GPU or many, or a laptop CPU.

What a run does, in the order of this file (its flags, data loading and result files: longlora/run.py):

    text / JSONL ──tokenize once──► tokens.bin (memory-mapped, uint16/uint32) + tokens.bin.json (longlora/data.py)
                                        │ cut into windows of ctx+1 tokens, a few held out
                                        ▼
    base model (bf16, frozen) ──► RoPE interpolation: positions / ceil(ctx / original context)
                              ──► LoRA r=8 α=16 on wq wk wv wo, + embeddings and norms train (fp32)
                              ──► S²-Attn (or SF-Attn) while training, full attention for evaluation
                              ──► FSDP2: fully_shard(every block, the embeddings, the output), then
                                  fully_shard(model), all on the meta device; then each rank reads only its
                                  own shard of the weights (longlora/shard.py)
                                        │ AdamW, warmup then constant (or cosine), grad clip 1
                                        ▼
    out/metrics.jsonl, out/checkpoints/step-NNNNNN/ (resumable; longlora/checkpoint.py), and the result:
    out/adapter.safetensors + out/adapter_config.json (longlora/adapter.py; sample.py and `lora.py merge` load it)
    --full: every parameter trains (fp32 masters), no LoRA; the result is the whole model in --model's layout
    and dtype, with the RoPE scaling and the new context in its config

Launch:

    python train.py --model llama-2-7b --data pg19/train --ctx 8192 --out out/7b-8k     # one process: a GPU, or the CPU
    # one machine, 8 GPUs: each rank holds 1/8 of the weights (FSDP), reads 1/8 of each batch
    torchrun --standalone --nproc_per_node=8 train.py --model llama-2-7b --data redpajama.jsonl --ctx 32768 --out out/7b-32k
    # several machines (run on each; the same flags everywhere)
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 train.py --model ... --out ...
    # continue a run that stopped (same flags, plus --resume; the losses continue exactly)
    torchrun --standalone --nproc_per_node=8 train.py --model llama-2-7b ... --out out/7b-32k --resume out/7b-32k
    # supervised fine-tuning on instruction data as LongAlpaca (templates, groups, loss weighting: longlora/data.py)
    python train.py --sft --sft-template longalpaca --model 7b-32k-merged --data LongAlpaca-12k.json --ctx 32768 --out sft
    # full fine-tuning: every parameter trains; writes a whole model in the base's layout
    torchrun --standalone --nproc_per_node=8 train.py --full --model llama-2-7b-hf --data redpajama.jsonl --ctx 8192 --out 7b-full
    # (--from-scratch PRESET pre-trains a small model, every parameter, as the CPU demo does)
    python train.py --estimate --preset llama2-7b --ctx 32768 --gpus 8   # memory and FLOPs, no weights loaded

Decisions a reader should know about (packing, the held-out split and the sample order are in longlora/data.py;
what a checkpoint holds and why a kill cannot break it, in longlora/checkpoint.py):
  * The loss of a step is the mean over all target tokens of the global batch (all micro-batches of all
    ranks), not a mean of per-micro-batch means as in LongLoRA's HF Trainer scripts; so SFT batches with
    few answer tokens weigh less, and the result does not depend on how the batch is split across ranks.
  * Mixed precision (GPU): the frozen base stays bf16; the trainable tensors (LoRA, embeddings, norms; all of
    them with --full) are fp32 masters, the only ones AdamW keeps state for (140M numbers of LLaMA2-7B with
    LoRA+, not 6.7B). FSDP2 (param_dtype bf16, reduce_dtype fp32; from torch 2.8 it takes frozen bf16 and trainable
    fp32 parameters in one unit) or, in one process, torch.autocast computes in bf16, the LoRA branch too.
"""

import json
import math
import os
import signal
import time
from contextlib import ExitStack, nullcontext

import torch
import torch.distributed as dist

from longlora import memory
from longlora.adapter import base_fingerprint
from longlora.checkpoint import checkpoint_dirs, find_checkpoint, full_trainable_state, load_checkpoint, save_checkpoint
from longlora.cli import UsageError, entry
from longlora.data import longlora_sft_group_size, sample_positions
from longlora.estimate import run_estimate
from longlora.output import write_text
from longlora.run import (StopSignals, attention_backend, check_result, claim_run, exit_process, find_start, fmt_time, load_data,
                          log0, log_metrics, parse_args, peak_memory_gb, reset_peak_memory, sft_group_rule, trajectory_config,
                          write_result)
from longlora.shard import all_sum, broadcast0, load_weights, lora_init_values, on_some_ranks, setup_distributed, shard_model
from longlora.tokenizer import Tokenizer, find_tokenizer
from longlora.weights import check_tokenizer_fits, read_checkpoint
from lora import apply_lora, mark_trainable, trainable_summary
from model import ModelArgs, Transformer, preset


# ----------------------------------------------------------------------------------------------------
# LongLoRA's recipe (its paper and fine-tune.py): the defaults of the flags of the same name (--help shows them all)


RECIPE = dict(
    ctx=8192,  # training sequence length; RoPE positions are divided by ceil(ctx / the base's original context)
    attn="s2",  # S²-Attn in training (groups of ctx/4, half of the heads shifted); evaluation uses full attention
    lora_r=8,  # LoRA rank
    lora_alpha=16.0,  # the LoRA update is scaled by alpha / r
    lora_dropout=0.0,  # dropout on the LoRA branch's input
    lora_targets=["wq", "wk", "wv", "wo"],  # the attention projections; the embeddings and norms train too (LoRA+)
    lr=2e-5,  # AdamW's peak learning rate
    warmup=20,  # linear warmup steps, then...
    schedule="constant",  # ...a constant learning rate
    weight_decay=0.0,  # AdamW's, on the matrices
    beta2=0.999,  # AdamW's second-moment decay (beta1 is 0.9)
    batch_size=1,  # sequences per micro-batch per GPU
    grad_accum=8,  # micro-batches per optimizer step: 8 sequences per GPU and step
    steps=1000,  # optimizer steps
    grad_clip=1.0,  # the global gradient norm is clipped to this
)


# ----------------------------------------------------------------------------------------------------
# The model: LLaMA2 with position interpolation, LoRA (or all parameters) trainable


def build_model(a, tokenizer, device, distributed, checkpoint, bf16):
    """The model with LoRA (or all parameters) trainable, trainable tensors fp32, frozen ones in the compute dtype.
    A --model (`checkpoint`: read_checkpoint's (args, weights)) is built on the meta device, sharded, and then
    filled: each rank reads only its shard (longlora/shard.py). Returns (model, fingerprint of the frozen base,
    the dtype a --full result is written in).

    a. The same random init on every rank (and LoRA's); a --model is built on the meta device, no memory yet.
    b. Position interpolation: ctx positions squeezed into the range the base was trained on.
    c. LoRA on the targets, LoRA+'s tensors trainable (or every parameter); trainable tensors fp32, frozen bf16.
    d. Memory-lean training (model.lean), FSDP2 over the ranks, then each rank reads its shard of the weights."""
    frozen_dtype = torch.bfloat16 if bf16 else torch.float32
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
    fingerprint = base_fingerprint(model.state_dict().__getitem__, model.args.n_layers) if weights is None else None
    # --full writes its result in the checkpoint's own dtype (every tensor trains in fp32 below)
    save_dtype = weights.specs["tok_embeddings.weight"].dtype if weights is not None else torch.float32
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
    model.lean = True  # the same numbers with far less memory (longlora/memory.py)
    model.gradient_checkpointing = not a.no_grad_ckpt
    model.offload_activations = a.offload_activations
    if distributed:
        shard_model(model, device, bf16)
    if weights is not None:
        on_some_ranks(lambda: load_weights(model, weights, device, lora_init, a.model), True, distributed)
        fingerprint = base_fingerprint(lambda name: weights.read([name])[name], args.n_layers)  # a tensor at a time
    elif not distributed:
        model.to(device)
    return model, fingerprint, save_dtype


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
def evaluate(model, data, a, step, metrics, rank, world, device, distributed, autocast):
    """Mean held-out loss over the first --eval-samples sequences, with full attention (as the model is used),
    printed and appended to metrics.jsonl. Every rank runs the same number of forwards (FSDP all-gathers inside
    each), padding with empty batches."""
    if data is None or a.eval_samples == 0:
        return
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
    loss = total / max(count, 1)
    log0(rank, f"step {step}: held-out loss {loss:.4f} (ppl {math.exp(min(loss, 50)):.2f})")
    log_metrics(metrics, rank, {"step": step, "heldout_loss": loss})


def train(a, stop, held):
    rank, local_rank, world, device, distributed, wait_group = setup_distributed()
    # One run per --out at a time (rank 0 holds the lock until train.py ends; every rank learns if it is taken).
    held.enter_context(on_some_ranks(lambda: claim_run(a), rank == 0, distributed) or nullcontext())
    if a.resume:  # only rank 0 reads it (other machines may not see the disk): checked there now, the rest below
        on_some_ranks(lambda: find_checkpoint(a.resume), rank == 0, distributed)
    bf16 = a.dtype == "bf16" or (a.dtype == "auto" and device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 and not distributed else nullcontext()

    # -- tokenizer, data, model
    tok_path = a.tokenizer or find_tokenizer(a.model)
    tokenizer = Tokenizer(tok_path)
    # --model's config and tensor index (no weights yet), before the data: a broken checkpoint is reported at
    # once, not after a tokenization that can take an hour
    checkpoint = on_some_ranks(lambda: read_checkpoint(a.model, ModelArgs), True, distributed) if a.model else None
    train_data, held_data = load_data(a, tokenizer, local_rank, distributed, wait_group)
    model, fingerprint, save_dtype = build_model(a, tokenizer, device, distributed, checkpoint, bf16)
    if a.no_ffn_chunks:  # the feed-forward over the whole sequence (longlora/memory.py), for this run
        held.callback(setattr, memory, "FFN_CHUNK_SIZE", memory.FFN_CHUNK_SIZE)
        memory.FFN_CHUNK_SIZE = 0
    check_result(a, model)  # the result can be written: found out now, not after the training
    reset_peak_memory(device)
    log0(rank, f"model: {model.num_params() / 1e6:.2f}M parameters, ctx {a.ctx}, rope scaling {model.args.rope_scaling:g}, "
               f"attn {a.attn}, {'bf16' if bf16 else 'fp32'}, {world} process(es) on {device.type}" +
               (", FSDP" if distributed else ""))
    log0(rank, f"attention backend: {attention_backend(device, bf16)}")
    log0(rank, f"{'trainable: all parameters' if a.from_scratch or a.full else trainable_summary(model)}; "
               f"data: {len(train_data)} training sequences, {len(held_data) if held_data else 0} held out")

    # -- optimizer: only trainable tensors, so AdamW keeps fp32 state for nothing else; no decay on norms
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": a.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=a.lr, betas=(0.9, a.beta2), eps=1e-8)

    # -- resume: rank 0 alone reads the disk (other machines may not see it) and broadcasts
    config = trajectory_config(a, world)
    torch.manual_seed(a.seed + 1 + rank)  # each rank its own stream (LoRA dropout); a resume restores them
    ckpt, start, files = on_some_ranks(lambda: find_start(a, model, config), rank == 0, distributed) or (None, None, None)
    ckpt, start = broadcast0((ckpt, start), distributed)
    if ckpt:
        load_checkpoint(ckpt, files, model, opt, rank, world, distributed, wait_group)
        log0(rank, f"resumed from {ckpt} at step {start}")
    metrics = os.path.join(a.out, "metrics.jsonl")
    if rank == 0:  # a resumed run keeps the records up to its checkpoint
        os.makedirs(a.out, exist_ok=True)
        old = open(metrics).read().splitlines() if os.path.exists(metrics) and a.resume else []
        write_text(metrics, "".join(line + "\n" for line in old if json.loads(line)["step"] <= start))

    # -- the loop
    model.train()
    if a.eval_every and start == 0:
        evaluate(model, held_data, a, 0, metrics, rank, world, device, distributed, autocast)
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
            if sft_group_rule(a) == "official":  # LongLoRA's rule, from the longest example (truncated at ctx)
                model.args.group_size = longlora_sft_group_size(min(int(lengths.max()) + 1, a.ctx))
            # lengths stay on the CPU: the model reads them to the host once per forward (no wait for the device)
            ls = token_loss_sum(model, x.to(device), y.to(device), lengths, autocast)
            # FSDP averages gradients over ranks; times `world` makes it the sum, / n_target the global token mean.
            (ls * world / max(n_target, 1)).backward()
            loss_sum += ls.detach()
        loss, stopping = all_sum([loss_sum.item(), float(stop.signum or 0)], device, distributed)  # (every rank agrees)
        loss /= max(n_target, 1)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, a.grad_clip if a.grad_clip > 0 else float("inf"))
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
        log_metrics(metrics, rank, {"step": step, "loss": loss, "lr": lr, "grad_norm": float(grad_norm), "tokens": int(n_real),
                                    "tokens_per_s": n_real / dt, "step_time_s": dt, "peak_mem_gb": peak, "eta_s": eta})
        if step % a.log_every == 0 or step == a.steps:
            log0(rank, f"step {step}/{a.steps} | loss {loss:.4f} | lr {lr:.2e} | {n_real / dt:,.0f} tok/s | "
                       f"{dt:.2f} s/step | peak {peak:.2f} GB ({peak_kind}) | eta {fmt_time(eta)}")
        if a.eval_every and step % a.eval_every == 0 and step != a.steps:
            evaluate(model, held_data, a, step, metrics, rank, world, device, distributed, autocast)
        if step % a.save_every == 0 or step == a.steps or stopping:
            state = {"step": step, "samples_seen": step * G, "config": config, "rope_scaling": model.args.rope_scaling,
                     "max_seq_len": model.args.max_seq_len, "base_fingerprint": fingerprint}  # (also read as an adapter)
            save_checkpoint(a.out, step, model, opt, state, a.keep, rank, world, wait_group)
        if stopping:
            log0(rank, f"stopped at step {step}: checkpoint saved in {a.out}/checkpoints; to continue, run the same "
                       f"command with --resume {a.out}")
            return 128 + (stop.signum or signal.SIGTERM)  # 130 for SIGINT, 143 for SIGTERM (as shells report them)
    evaluate(model, held_data, a, step, metrics, rank, world, device, distributed, autocast)

    # -- the result, written by rank 0: an adapter (LoRA), or a whole model in the base's layout (--full, --from-scratch)
    tensors = full_trainable_state(model, keep=rank == 0)
    if rank == 0:
        write_result(a, model, tensors, fingerprint, save_dtype, tok_path, bf16)
        log0(rank, f"wrote {'model' if a.full or a.from_scratch else 'adapter'} to {a.out}")
    if distributed:
        dist.barrier()
    return 0


# ----------------------------------------------------------------------------------------------------
# Entry point: a user's mistake is one "error:" line and exit 2, also under torchrun


@entry
def main(argv=None) -> int:
    try:
        a = parse_args(argv, RECIPE)  # flags and their checks: longlora/run.py
        if a.estimate:
            return run_estimate(a)
        with StopSignals() as stop, ExitStack() as held:
            return train(a, stop, held)
    finally:
        if dist.is_available() and dist.is_initialized() and "WORLD_SIZE" in os.environ:
            dist.destroy_process_group()


if __name__ == "__main__":
    exit_process(main())  # under torchrun without the interpreter's shutdown (longlora/run.py says why)
