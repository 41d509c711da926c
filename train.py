"""
Long-context fine-tuning of LLaMA2 (LongLoRA / SinkLoRA): one file, one GPU or many, or a laptop CPU.

What a training run does, in order:

    text / JSONL ──tokenize once──► tokens.bin (memory-mapped, uint16/uint32) + tokens.bin.json
                                        │ cut into windows of ctx+1 tokens, a few held out
                                        ▼
    base model (bf16, frozen) ──► RoPE interpolation: positions / ceil(ctx / original context)
                              ──► LoRA r=8 α=16 on wq wk wv wo, + embeddings and norms train (fp32)
                              ──► S²-Attn (or SF-Attn) while training, full attention for evaluation
                              ──► FSDP2: fully_shard(every block), then fully_shard(model)
                                        │ AdamW, warmup then constant (or cosine), grad clip 1
                                        ▼
    out/metrics.jsonl, out/checkpoints/step-NNNNNN/ (resumable), and the result:
    out/adapter.safetensors + out/adapter_config.json (lora.py's format; sample.py and `lora.py merge` load it)

Defaults are LongLoRA's recipe: S²-Attn with groups of ctx/4, LoRA r=8 α=16 on the attention projections
with trainable embeddings and norms, AdamW lr 2e-5 (betas 0.9/0.999, weight decay 0), 20 warmup steps then
constant, batch 1 per device, gradient accumulation 8, 1000 steps, grad clip 1.0, bf16 on GPU, activation
checkpointing on.

Launch:

    # one process (a GPU if there is one, else the CPU)
    python train.py --model llama-2-7b --data pg19/train --ctx 8192 --out out/7b-8k
    # one machine, 8 GPUs: each rank holds 1/8 of the weights (FSDP), reads 1/8 of each batch
    torchrun --standalone --nproc_per_node=8 train.py --model llama-2-7b --data redpajama.jsonl --ctx 32768 --out out/7b-32k
    # several machines (run on each; the same flags everywhere)
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 train.py --model ... --out ...
    # continue a run that stopped (same flags, plus --resume; the losses continue exactly)
    torchrun --standalone --nproc_per_node=8 train.py --model llama-2-7b ... --out out/7b-32k --resume out/7b-32k
    # supervised fine-tuning on instruction data (LongAlpaca-style JSON), LLaMA2's [INST] format
    python train.py --sft --model out/7b-32k-merged --data LongAlpaca-12k.json --ctx 32768 --out out/sft
    # pre-train a small model from scratch (full parameters, no LoRA; the CPU demo does this)
    python train.py --from-scratch demo --tokenizer tok.model --data corpus/ --ctx 256 --lr 2e-3 --out out/base
    # memory and FLOPs of a run, without loading any weights
    python train.py --estimate --preset llama2-7b --ctx 32768 --gpus 8

Decisions a reader should know about:
  * Packing. Every document becomes [BOS] text [EOS] (LLaMA's tokenizer puts BOS at the start of a text;
    EOS marks where it ends), documents are concatenated, and window i is tokens[i*ctx : i*ctx + ctx + 1]:
    input = window[:-1], target = window[1:]. Neighbouring windows share one token, so every token but the
    first is a target exactly once. Tokens may attend to the previous document in the same window (as in
    LongLoRA and most pre-training); the EOS/BOS pair tells the model where one ends.
  * Held-out split: every k-th window (evenly spread over the corpus, not the tail of the last file) is
    held out when --heldout > 0; or --eval-data names separate held-out files.
  * The loss of a step is the mean over all target tokens of the global batch (all micro-batches of all
    ranks), not a mean of per-micro-batch means; so SFT batches with few answer tokens weigh less, and the
    result does not depend on how the batch is split across ranks.
  * Mixed precision (GPU): the frozen base stays bf16; the trainable tensors (LoRA, embeddings, norms) are
    fp32 and are what AdamW sees, so optimizer state exists only for them. FSDP2 computes in bf16
    (MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)): its one requirement, a single dtype over
    the *trainable* parameters of each fully_shard group, holds because all of them are fp32. A single
    process uses torch.autocast(bf16) for the same effect.
  * A checkpoint is a directory written under a temporary name and renamed when complete; the previous one
    is deleted only after that, so a run killed at any moment leaves a loadable checkpoint.
"""

import argparse
import datetime
import functools
import hashlib
import json
import math
import os
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from attention import resolve_group_size
from lora import DEFAULT_TARGETS, TARGETS, apply_lora, mark_trainable, save_adapter, trainable_summary
from model import (PRESETS, CheckpointError, ModelArgs, Tokenizer, Transformer, atomic_write, find_tokenizer,
                   hf_config_to_args, preset)


class UsageError(Exception):
    """A user's mistake on the command line: main() prints 'error: <message>' and returns 2."""


# ----------------------------------------------------------------------------------------------------
# Data: documents -> one memory-mapped token file, tokenized once and reused

TOKENS_FORMAT = "longlora-tokens-1"  # bump when the layout of the token files changes


def source_files(paths):
    """The --data arguments as a list of files: a folder becomes its files (recursive, sorted, no hidden ones)."""
    files = []
    for p in paths:
        if os.path.isdir(p):
            for root, dirs, names in os.walk(p):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))  # also fixes the walk order
                files += [os.path.join(root, n) for n in sorted(names) if not n.startswith(".")]
        elif os.path.isfile(p):
            files.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such file or directory")
    if not files:
        raise ValueError(f"empty dataset: no files in {', '.join(paths)}")
    return files


def read_records(path):
    """The records of a .json (a list of objects) or .jsonl (one object per line) file."""
    try:
        with open(path, encoding="utf-8") as f:
            if path.endswith(".jsonl"):
                for i, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            yield json.loads(line)
                        except json.JSONDecodeError as e:
                            raise ValueError(f"{path}:{i}: not a JSON line ({e.msg})") from None
            else:
                data = json.load(f)
                if not isinstance(data, list):
                    raise ValueError(f"{path}: expected a JSON list of records")
                yield from data
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text") from None


def read_documents(files):
    """Yield document strings: a .jsonl/.json file holds records with a `text` field; any other file is one document."""
    for path in files:
        if path.endswith((".jsonl", ".json")):
            for i, rec in enumerate(read_records(path)):
                if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                    raise ValueError(f"{path}: record {i} has no string field 'text'")
                yield rec["text"]
        else:
            try:
                with open(path, encoding="utf-8") as f:
                    yield f.read()
            except UnicodeDecodeError:
                raise ValueError(f"{path}: not UTF-8 text") from None


def token_dtype(vocab_size):
    return np.uint16 if vocab_size <= 2**16 else np.uint32


def file_sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def data_key(files, tokenizer, kind):
    """What the token file depends on: the input files (path, size, modification time), the tokenizer's
    bytes and the kind of preparation. Equal keys mean the cached tokens can be reused."""
    stats = [[os.path.abspath(f), os.path.getsize(f), os.stat(f).st_mtime_ns] for f in files]  # lists: as JSON reads them back
    return dict(format=TOKENS_FORMAT, kind=kind, files=stats, tokenizer_sha256=file_sha256(tokenizer.path))


def _cached(out_path, key):
    """The sidecar of out_path if it was written for exactly this key (and the token file is whole)."""
    try:
        with open(out_path + ".json") as f:
            meta = json.load(f)
        whole = os.path.getsize(out_path) == meta["n_tokens"] * np.dtype(meta["dtype"]).itemsize
        return meta if meta["key"] == key and whole else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_tokens(out_path, dtype, sequences):
    """Stream lists of token ids into out_path, atomically (a temporary file, then a rename). Returns the count."""
    n_tokens = 0

    def write(tmp):
        nonlocal n_tokens
        with open(tmp, "wb") as f:
            for ids in sequences:
                np.asarray(ids, dtype=dtype).tofile(f)
                n_tokens += len(ids)

    atomic_write(out_path, write)
    return n_tokens


def _write_sidecar(out_path, key, tokenizer, dtype, n_tokens, **extra):
    """out_path + ".json": what the token file holds and what it was made from (written after the tokens)."""
    meta = dict(key=key, dtype=np.dtype(dtype).name, vocab_size=tokenizer.vocab_size, tokenizer=tokenizer.path,
                bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id, n_tokens=n_tokens, **extra)
    text = json.dumps(meta, indent=1)
    atomic_write(out_path + ".json", lambda f: open(f, "w").write(text))


def open_tokens(path):
    """The token file written by prepare_tokens / prepare_sft, memory-mapped read-only (dtype from its sidecar)."""
    with open(path + ".json") as f:
        meta = json.load(f)
    return np.memmap(path, dtype=np.dtype(meta["dtype"]), mode="r")


def prepare_tokens(paths, tokenizer, out_path):
    """Tokenize text files / folders / JSONL (`text` field) once into out_path; reuse it when nothing changed.

    Each non-empty document becomes [BOS] ids [EOS] and the documents are concatenated in file order.
    Returns the tokens as a read-only np.memmap (uint16 when the vocabulary fits, else uint32); the sidecar
    out_path + ".json" records dtype, vocabulary size, tokenizer path and hash, and the document count.
    """
    files = source_files(paths)
    key = data_key(files, tokenizer, "text")
    if _cached(out_path, key) is None:
        if tokenizer.eos_id < 0:
            raise ValueError(f"{tokenizer.path}: the tokenizer has no EOS token to join documents with")
        dtype, n_docs = token_dtype(tokenizer.vocab_size), 0

        def docs():
            nonlocal n_docs
            for text in read_documents(files):
                if text.strip():  # an empty document would only add a BOS/EOS pair
                    n_docs += 1
                    yield tokenizer.encode(text, bos=tokenizer.bos_id >= 0, eos=True)

        n_tokens = _write_tokens(out_path, dtype, docs())
        if n_docs == 0:
            os.remove(out_path)
            raise ValueError(f"empty dataset: no text in {', '.join(paths)}")
        _write_sidecar(out_path, key, tokenizer, dtype, n_tokens, n_docs=n_docs)
    return open_tokens(out_path)


def split_heldout(n, fraction):
    """(train ids, held-out ids) of n items: round(n * fraction) held out (at least 1 when fraction > 0 and
    n >= 2), spread evenly over the range, so the held-out text comes from all over the corpus."""
    n_held = 0 if fraction <= 0 or n < 2 else min(n - 1, max(1, round(n * fraction)))
    held = np.unique(((np.arange(n_held) + 0.5) * n / max(n_held, 1)).astype(np.int64))
    mask = np.zeros(n, dtype=bool)
    mask[held] = True
    return np.flatnonzero(~mask), np.flatnonzero(mask)


class PackedData:
    """Windows of ctx + 1 tokens over one token stream; `ids` selects which windows belong to this split.

        tokens   t0 t1 t2 ... t_ctx t_ctx+1 ... t_2ctx ...
        window 0 [t0 ............ t_ctx]                   input t0..t_ctx-1, target t1..t_ctx
        window 1                 [t_ctx ............ t_2ctx]
    """

    def __init__(self, tokens, ctx, ids=None):
        self.tokens, self.ctx = tokens, ctx
        self.n_windows = (len(tokens) - 1) // ctx
        self.ids = np.arange(self.n_windows) if ids is None else np.asarray(ids)

    def __len__(self):
        return len(self.ids)

    def batch(self, positions):
        """(x, y, lengths) for the given positions in this split: x, y (B, ctx) int64; lengths None (no padding)."""
        starts = self.ids[np.asarray(positions)] * self.ctx
        w = np.stack([self.tokens[s:s + self.ctx + 1] for s in starts]).astype(np.int64)  # (B, ctx + 1)
        w = torch.from_numpy(w)
        return w[:, :-1], w[:, 1:], None  # (B, ctx) each


# ----------------------------------------------------------------------------------------------------
# Supervised fine-tuning data: [INST] prompt [/INST] answer, loss on the answer only

def sft_example(tokenizer, rec):
    """(ids, n_prompt): [BOS] "[INST] instruction\\n\\ninput [/INST]" answer [EOS], LLaMA2-chat's format.

    Prompt and answer are encoded separately (then concatenated) so that the boundary between them is
    exact: the first n_prompt ids are the prompt and get no loss.
    """
    instruction, inp = rec["instruction"].strip(), (rec.get("input") or "").strip()
    prompt = f"[INST] {instruction}\n\n{inp} [/INST]" if inp else f"[INST] {instruction} [/INST]"
    prompt_ids = tokenizer.encode(prompt, bos=tokenizer.bos_id >= 0, eos=False)
    answer_ids = tokenizer.encode(rec["output"].strip(), bos=False, eos=True)
    return prompt_ids + answer_ids, len(prompt_ids)


def prepare_sft(paths, tokenizer, out_path):
    """Tokenize JSON/JSONL records {instruction, input?, output} once. Returns (tokens memmap, index) where
    index (N, 3) int64 holds each example's start, prompt length and total length in the token file."""
    files = source_files(paths)
    key = data_key(files, tokenizer, "sft")
    index_path = out_path + ".index.npy"
    if _cached(out_path, key) is None or not os.path.exists(index_path):
        if tokenizer.eos_id < 0:
            raise ValueError(f"{tokenizer.path}: the tokenizer has no EOS token to end answers with")
        index = []

        def examples():
            start = 0
            for path in files:
                for i, rec in enumerate(read_records(path)):
                    ok = isinstance(rec, dict) and all(isinstance(rec.get(k), str) for k in ("instruction", "output"))
                    if not ok:
                        raise ValueError(f"{path}: record {i} needs string fields 'instruction' and 'output'")
                    ids, n_prompt = sft_example(tokenizer, rec)
                    index.append((start, n_prompt, len(ids)))
                    start += len(ids)
                    yield ids

        dtype = token_dtype(tokenizer.vocab_size)
        n_tokens = _write_tokens(out_path, dtype, examples())
        if not index:
            os.remove(out_path)
            raise ValueError(f"empty dataset: no records in {', '.join(paths)}")
        arr = np.asarray(index, dtype=np.int64).reshape(-1, 3)
        atomic_write(index_path, lambda f: np.save(open(f, "wb"), arr))
        _write_sidecar(out_path, key, tokenizer, dtype, n_tokens, n_examples=len(index))
    return open_tokens(out_path), np.load(index_path)


class SFTData:
    """Instruction examples, right-padded per micro-batch to a length the attention groups fit.

    An example longer than ctx + 1 tokens is cut to ctx + 1 (its answer loses its end). Targets are -100
    on the prompt and on the padding; `lengths` tells the model how many tokens of each row are real, so
    padded keys are never attended.
    """

    def __init__(self, tokens, index, ctx, multiple, pad_id, ids=None):
        self.tokens, self.index, self.ctx, self.multiple, self.pad_id = tokens, index, ctx, multiple, pad_id
        self.ids = np.arange(len(index)) if ids is None else np.asarray(ids)

    def __len__(self):
        return len(self.ids)

    def batch(self, positions):
        rows = [self.index[self.ids[p]] for p in np.asarray(positions)]
        seqs = [np.asarray(self.tokens[s:s + min(n, self.ctx + 1)], dtype=np.int64) for s, _, n in rows]
        longest = max(len(s) - 1 for s in seqs)
        T = min(self.ctx, -(-longest // self.multiple) * self.multiple)  # round up to a multiple; ctx is one
        x = torch.full((len(seqs), T), self.pad_id, dtype=torch.long)  # (B, T)
        y = torch.full((len(seqs), T), -100, dtype=torch.long)  # (B, T)
        lengths = torch.zeros(len(seqs), dtype=torch.long)
        for b, (seq, (_, n_prompt, _)) in enumerate(zip(seqs, rows)):
            n = len(seq) - 1
            x[b, :n] = torch.from_numpy(seq[:-1])
            y[b, :n] = torch.from_numpy(seq[1:])
            y[b, :n_prompt - 1] = -100  # target t is token t+1: prompt tokens 1 .. n_prompt-1 are not learned
            lengths[b] = n
        return x, y, lengths


# ----------------------------------------------------------------------------------------------------
# Sample order and learning rate: pure functions of (seed, step), so a resumed run repeats them exactly


@functools.lru_cache(maxsize=4)  # a step draws from one or two epochs: keep their permutations
def epoch_order(n, seed, epoch):
    return np.random.default_rng([seed, epoch]).permutation(n)


def sample_positions(n, seed, first, count):
    """Positions (into a split of n items) of global samples first .. first+count-1: each epoch is a fresh
    permutation drawn from (seed, epoch)."""
    out = []
    for i in range(first, first + count):
        epoch, k = divmod(i, n)
        out.append(epoch_order(n, seed, epoch)[k])
    return np.asarray(out)


def lr_at(step, a):
    """Learning rate of optimizer step `step` (1-based): linear warmup, then constant or cosine to lr*min_lr_ratio."""
    if a.warmup and step <= a.warmup:
        return a.lr * step / a.warmup
    if a.schedule == "constant":
        return a.lr
    progress = (step - a.warmup) / max(1, a.steps - a.warmup)  # 0 right after warmup, 1 at the last step
    floor = a.lr * a.min_lr_ratio
    return floor + (a.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


# ----------------------------------------------------------------------------------------------------
# Distributed setup: torchrun sets RANK / LOCAL_RANK / WORLD_SIZE; without them we run single-process


def setup_distributed():
    """(rank, local_rank, world, device, distributed)."""
    if "WORLD_SIZE" not in os.environ:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return 0, 0, 1, device, False
    rank, local_rank, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        # A long timeout: on the first run local rank 0 tokenizes the whole dataset while the others wait in a
        # collective, which can take longer than NCCL's 10-minute default.
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(hours=4))
    return rank, local_rank, world, device, True


def shard_model(model, device, bf16):
    """FSDP2: each TransformerBlock becomes one all-gather/reduce-scatter unit, the root holds the rest
    (tok_embeddings, norm, output). Parameters become DTensors sharded on dim 0 across the ranks.

    With bf16, parameters are all-gathered in bf16 and gradients reduce-scattered in fp32; the frozen
    weights are already bf16 (no cast), the trainable fp32 ones are cast for the compute and keep fp32
    sharded masters. FSDP2 asserts one original dtype over the *trainable* parameters of a group only
    (frozen ones may differ), which holds because every trainable tensor is fp32.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    for block in model.layers:
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)  # moves the parameters to `device` as it shards them
    return model


def all_sum(values, device, distributed):
    """Sum a list of floats over all ranks (fp64, so token counts stay exact)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if distributed:
        dist.all_reduce(t)
    return t.tolist()


def on_some_ranks(fn, here, distributed):
    """Run fn() on the ranks where `here` is true, and make every rank agree on the outcome: if it failed
    anywhere, all ranks raise the same UsageError (instead of the others waiting forever at a collective).
    Returns fn's result where it ran, else None."""
    result, err = None, None
    if here:
        try:
            result = fn()
        except (UsageError, CheckpointError, FileNotFoundError, ValueError) as e:
            err = str(e)
    if distributed:
        errs = [None] * dist.get_world_size()
        dist.all_gather_object(errs, err)
        err = next((e for e in errs if e), None)
    if err:
        raise UsageError(err)
    return result


def broadcast0(obj, distributed):
    """Rank 0's object on every rank."""
    if not distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def full_trainable_state(model, keep=True):
    """{name: full fp32 CPU tensor} of every trainable parameter. Under FSDP each parameter is a DTensor
    shard; full_tensor() all-gathers it, so every rank must call this; only ranks with keep=True (rank 0)
    copy the result to the CPU, the others get {}."""
    from torch.distributed.tensor import DTensor

    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            t = p.full_tensor() if isinstance(p, DTensor) else p
            if keep:
                out[name] = t.detach().to("cpu", torch.float32).clone()
    return out


# ----------------------------------------------------------------------------------------------------
# Checkpoints: out/checkpoints/step-NNNNNN/{trainable.safetensors, optimizer.pt, rng.pt, state.json}

# Test hook (used by tests/test_train.py only): "STEP:SECONDS" makes rank 0 sleep in the middle of writing
# the checkpoint of that step, after the weights and before the rest, so a test can kill it mid-save.
PAUSE_ENV = "TRAIN_TEST_PAUSE_IN_SAVE"


def checkpoint_dirs(run_dir):
    """Complete checkpoints of a run, oldest first (temporary, half-written ones start with '.')."""
    root = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(root):
        return []
    names = sorted(n for n in os.listdir(root) if n.startswith("step-") and
                   os.path.exists(os.path.join(root, n, "state.json")))
    return [os.path.join(root, n) for n in names]


def find_checkpoint(path):
    """A checkpoint directory itself, or the newest complete checkpoint of a run directory."""
    if os.path.exists(os.path.join(path, "state.json")):
        return path
    found = checkpoint_dirs(path)
    if not found:
        raise UsageError(f"--resume {path}: no complete checkpoint there (expected state.json or checkpoints/step-*)")
    return found[-1]


def save_checkpoint(run_dir, step, model, opt, state, keep, rank, world):
    """Write checkpoint `step` atomically: into checkpoints/.tmp-step-N-PID, then one rename. All ranks call
    this (gathering the sharded tensors is collective); rank 0 alone writes. Older checkpoints beyond
    `keep` are deleted only after the new one is in place."""
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    tensors = full_trainable_state(model, keep=rank == 0)
    optim = get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    rng = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
    rngs = [None] * world
    if world > 1:
        dist.all_gather_object(rngs, rng)
    else:
        rngs = [rng]
    if rank == 0:
        root = os.path.join(run_dir, "checkpoints")
        os.makedirs(root, exist_ok=True)
        final = os.path.join(root, f"step-{step:06d}")
        tmp = os.path.join(root, f".tmp-step-{step:06d}-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        save_file(tensors, os.path.join(tmp, "trainable.safetensors"), metadata={"format": "pt"})
        pause = os.environ.get(PAUSE_ENV, "")
        if pause and int(pause.split(":")[0]) == step:
            time.sleep(float(pause.split(":")[1]))
        torch.save(optim, os.path.join(tmp, "optimizer.pt"))
        torch.save(rngs, os.path.join(tmp, "rng.pt"))
        with open(os.path.join(tmp, "state.json"), "w") as f:  # written last: its presence means "complete"
            json.dump(state, f, indent=1)
        for name in os.listdir(tmp):  # data on disk before the rename makes it visible
            with open(os.path.join(tmp, name), "rb") as f:
                os.fsync(f.fileno())
        if os.path.exists(final):  # re-saving the same step (a resumed run): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in checkpoint_dirs(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        for name in os.listdir(root):  # leftovers of runs killed mid-save
            if name.startswith(".tmp-step-"):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    if world > 1:
        dist.barrier()


def load_checkpoint(ckpt, model, opt, rank, world, distributed):
    """Load trainable weights, optimizer state and RNG into an (FSDP-sharded or plain) model. Rank 0 reads the
    files; under FSDP the tensors are broadcast from it, so other machines need not see the disk."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    tensors, optim, rngs = {}, {}, None
    if rank == 0:
        tensors = load_file(os.path.join(ckpt, "trainable.safetensors"))
        optim = torch.load(os.path.join(ckpt, "optimizer.pt"), weights_only=True)
        rngs = torch.load(os.path.join(ckpt, "rng.pt"), weights_only=True)
    if distributed:
        opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)
        set_model_state_dict(model, tensors, options=opts)
        set_optimizer_state_dict(model, opt, optim, options=opts)
        rngs = broadcast0(rngs, distributed)
    else:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.requires_grad:
                    p.copy_(tensors[name])
        set_optimizer_state_dict(model, opt, optim, options=StateDictOptions(full_state_dict=True))
    if len(rngs) == world:  # same number of ranks: every rank continues its own random stream
        torch.set_rng_state(rngs[rank]["cpu"])
        if torch.cuda.is_available() and rngs[rank]["cuda"] is not None:
            torch.cuda.set_rng_state(rngs[rank]["cuda"])


def check_checkpoint(ckpt, model, config):
    """One-line UsageError if the checkpoint was written by a run with a different training config, or
    does not hold exactly this model's trainable tensors. Returns its state.json."""
    from safetensors import safe_open

    with open(os.path.join(ckpt, "state.json")) as f:
        state = json.load(f)
    for k, v in config.items():
        if state["config"].get(k) != v:
            raise UsageError(f"--resume {ckpt}: it was trained with {k}={state['config'].get(k)!r}, this run has "
                             f"{k}={v!r}; resuming needs the same training config")
    with safe_open(os.path.join(ckpt, "trainable.safetensors"), framework="pt") as f:
        have = set(f.keys())
    want = {n for n, p in model.named_parameters() if p.requires_grad}
    if have != want:
        diff = sorted(have ^ want)[0]
        raise UsageError(f"--resume {ckpt}: tensor {diff} is {'missing' if diff in want else 'unexpected'}; "
                         "the checkpoint does not fit this model")
    return state


# ----------------------------------------------------------------------------------------------------
# --estimate: memory per GPU and FLOPs per step, from the shapes alone


def param_counts(m: ModelArgs, lora_r, targets, embed, norms, full):
    """Parameter counts: total base, trainable, LoRA, one block (incl. LoRA), root (embeddings + output + norm)."""
    d, kv, F_, V, L = m.dim, m.n_kv_heads * m.head_dim, m.hidden_dim, m.vocab_size, m.n_layers
    shapes = {"wq": (d, d), "wk": (d, kv), "wv": (d, kv), "wo": (d, d), "w1": (d, F_), "w2": (F_, d), "w3": (d, F_)}
    block = sum(i * o for i, o in shapes.values()) + 2 * d  # seven matrices and two RMSNorm weights
    root = V * d * (1 if m.tie_embeddings else 2) + d
    total = L * block + root
    if full:
        return dict(total=total, trainable=total, lora=0, block=block, root=root, matmul=L * (block - 2 * d) + V * d)
    lora_block = sum(lora_r * (i + o) for t, (i, o) in shapes.items() if t in targets)
    lora = L * lora_block + (lora_r * (d + V) if "output" in targets else 0)
    trainable = lora + (V * d if embed else 0) + ((2 * L + 1) * d if norms else 0)
    return dict(total=total, trainable=trainable, lora=lora, block=block + lora_block, root=root,
                matmul=L * (block - 2 * d) + V * d)


def visible_pairs(mode, T, g, sinks):
    """(query, key) pairs one head computes, averaged over the heads: causal full attention T(T+1)/2; S²
    with groups of g: half the heads see their own group, the other half groups shifted by g/2 (first and
    last half-sized); SF also shows the first `sinks` keys to every query in a later group."""
    tri = lambda n: n * (n + 1) // 2
    if mode == "full":
        return tri(T)

    def pairs(starts):  # groups [start, next start), causal inside, plus the sink keys before the group
        bounds = list(starts) + [T]
        return sum(tri(e - s) + (e - s) * (min(sinks, s) if mode == "sf" else 0) for s, e in zip(bounds, bounds[1:]))

    plain = pairs(range(0, T, g))
    shifted = pairs([0] + list(range(g // 2, T, g)))
    return (plain + shifted) / 2


def layer_activation_bytes(m: ModelArgs, full=False, norms=True, lora_r=8, targets=DEFAULT_TARGETS):
    """Bytes per token that autograd keeps for one TransformerBlock of model.py computing in bf16 (what
    FSDP's bf16 mixed precision does), read off the backward graph. A frozen matmul keeps only its
    weight, not its input, which is why LoRA saves most of the activations of full fine-tuning.

      RMSNorm (x2)   the fp32 copy of x for the rsqrt 4d (and the rsqrt, 4), the bf16 normalised x for the norm weight's
                     gradient 2d (only if the norm trains)
      wq wk wv       their shared bf16 input 2d, kept for the LoRA A matrices (full fine-tuning: for the weights)
      LoRA           each target's A·x, r numbers: 2r per target
      RoPE           nothing per layer: its cos/sin are computed once per forward and shared by every layer
      attention      q, k, v and the output in bf16 (2d + 4kv + 2d; the output is also wo's input) and the
                     fp32 log-sum-exp per head 4H (FlashAttention and SDPA keep no T x T matrix)
      SwiGLU         w1·x (for silu), silu(w1·x) and w3·x (for their product): 3 x 2F; full fine-tuning
                     also keeps the frozen-in-LoRA inputs of w1/w3 (2d) and of w2 (2F)
    """
    d, kv, F_, H, hd = m.dim, m.n_kv_heads * m.head_dim, m.hidden_dim, m.n_heads, m.head_dim
    norm = 4 * d + 4 + (2 * d if norms or full else 0)  # + the fp32 rsqrt, one number per token
    attn_inputs = 2 * d
    lora = 0 if full else 2 * lora_r * sum(t in targets for t in ("wq", "wk", "wv", "wo", "w1", "w2", "w3"))
    attn = 2 * d + 4 * kv + 2 * d + 4 * H
    ffn = 3 * 2 * F_ + (2 * d + 2 * F_ if full else 0)
    return 2 * norm + attn_inputs + lora + attn + ffn


def estimate(m: ModelArgs, ctx, attn, gpus, batch, accum, lora_r=8, targets=DEFAULT_TARGETS, embed=True,
             norms=True, full=False, group_size=None, sinks=4):
    """Per-GPU memory (bytes) and FLOPs per optimizer step of a bf16 FSDP run; see the comments for each term."""
    c = param_counts(m, lora_r, targets, embed, norms, full)
    d, kv, F_, V, L, H, hd = m.dim, m.n_kv_heads * m.head_dim, m.hidden_dim, m.vocab_size, m.n_layers, m.n_heads, m.head_dim
    B, T, W = batch, ctx, gpus
    frozen = c["total"] - c["trainable"]
    mem = {}
    # Sharded state, split evenly across W GPUs by FSDP:
    mem["frozen weights (bf16)"] = 2 * frozen / W
    mem["trainable weights (fp32)"] = 4 * c["trainable"] / W
    mem["gradients (fp32)"] = 4 * c["trainable"] / W
    mem["AdamW state (2 x fp32)"] = 8 * c["trainable"] / W
    # FSDP's working set: the block that computes plus the one prefetched, all-gathered in bf16, the root's
    # tensors (embeddings, output) which stay gathered from forward to backward, and one block's gradients
    # before they are reduce-scattered.
    block_grads = 2 * (c["block"] if full else c["trainable"] / L)
    mem["FSDP gathered weights (bf16)"] = 2 * (2 * c["block"] + c["root"]) + block_grads
    per_layer = layer_activation_bytes(m, full, norms, lora_r, targets)  # per token, see below
    # The loss: in forward the bf16 logits, their fp32 copy and the fp32 log-softmax exist together (10 bytes
    # per vocabulary entry); backward starts with the saved log-softmax, its gradient and the gradient of
    # the fp32 logits alive together: 12 bytes x V per token, the peak.
    loss_peak = 12 * B * T * V
    final_norm = (6 if norms or full else 4) * d * B * T  # the last RMSNorm, as in a block
    # With checkpointing only each block's input survives the forward (2d per token and layer); the peak
    # is that plus the larger of the loss and one block recomputed in backward (its activations plus the
    # gradients in flight through its widest tensors, ~2 x 2F).
    saved_inputs = L * 2 * d * B * T
    mem["activations, checkpointing"] = saved_inputs + final_norm + max(loss_peak, (per_layer + 4 * F_) * B * T)
    mem["activations, no checkpointing"] = L * per_layer * B * T + final_norm + loss_peak
    static = sum(v for k, v in mem.items() if not k.startswith("activations"))
    # FLOPs per optimizer step, all GPUs together (a multiply-add counts 2):
    tokens = B * T * accum * W
    g = resolve_group_size(attn, T, group_size) if attn != "full" else None
    pairs = visible_pairs(attn, T, g, sinks)
    attn_fwd = L * H * 4 * hd * pairs * B  # per sequence: q·k and p·v for every visible pair, every head and layer
    # Backward is twice the forward; checkpointing reruns the forward once more (FlashAttention's own
    # recompute of the scores in backward is not counted, as usual for model FLOPs).
    passes = 3 + 1
    attn_flops = attn_fwd * passes * accum * W
    # Dense: 2 FLOPs per matmul weight per token forward; backward needs input gradients everywhere (2 per
    # weight) but weight gradients only for what trains; checkpointing recomputes the blocks' forward.
    blocks_matmul = c["matmul"] - V * d
    lora_matmul = c["lora"]
    fwd = 2 * (c["matmul"] + lora_matmul)
    bwd = 2 * (c["matmul"] + lora_matmul) + 2 * (c["matmul"] if full else lora_matmul)
    recompute = 2 * (blocks_matmul + lora_matmul)
    dense_flops = (fwd + bwd + recompute) * tokens
    return dict(params=c, memory=mem, static=static, tokens=tokens, group=g, attn_flops=attn_flops,
                dense_flops=dense_flops, total_ckpt=static + mem["activations, checkpointing"],
                total_no_ckpt=static + mem["activations, no checkpointing"])


def human(n):
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}k"


def format_estimate(e, name, ctx, attn, gpus, batch, accum, full):
    GB, c = 1e9, e["params"]
    lines = [f"estimate: {name}, ctx {ctx}, attn {attn}" + (f" (groups of {e['group']})" if e["group"] else "") +
             f", {gpus} GPU(s), batch {batch} x accumulation {accum} = {e['tokens']:,} tokens per step, bf16, FSDP",
             f"parameters: {human(c['total'])}, trainable {human(c['trainable'])}"
             + (" (full fine-tuning)" if full else f" (LoRA {human(c['lora'])} + embeddings/norms)"),
             "per-GPU memory (GB):"]
    for k, v in e["memory"].items():
        lines.append(f"  {k:<34} {v / GB:8.2f}")
    lines.append(f"  {'total with checkpointing':<34} {e['total_ckpt'] / GB:8.2f}")
    lines.append(f"  {'total without checkpointing':<34} {e['total_no_ckpt'] / GB:8.2f}")
    total = e["attn_flops"] + e["dense_flops"]
    lines.append(f"FLOPs per step (all GPUs): attention {e['attn_flops'] / 1e15:.1f} PFLOP, dense {e['dense_flops'] / 1e15:.1f} "
                 f"PFLOP, total {total / 1e15:.1f} PFLOP ({total / gpus / 1e15:.1f} per GPU; attention "
                 f"{100 * e['attn_flops'] / total:.0f}%)")
    return "\n".join(lines)


def config_args(path):
    """ModelArgs of a checkpoint directory from its config alone (no weights are read)."""
    for name in ("config.json", "params.json"):
        p = os.path.join(path, name)
        if os.path.isfile(p):
            with open(p) as f:
                cfg = json.load(f)
            if name == "config.json":
                return hf_config_to_args(cfg, p)
            if cfg.get("vocab_size", -1) <= 0:  # Meta's params.json: -1 means "the tokenizer's", 32000 for LLaMA2
                cfg["vocab_size"] = 32000
            known = {"dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "ffn_dim_multiplier",
                     "ffn_hidden_dim", "norm_eps", "rope_theta", "rope_scaling", "max_seq_len", "tie_embeddings"}
            return ModelArgs(**{k: v for k, v in cfg.items() if k in known})
    raise UsageError(f"--model {path}: no config.json or params.json")


# ----------------------------------------------------------------------------------------------------
# The training run


def log0(rank, msg):
    if rank == 0:
        print(msg, flush=True)


def peak_memory_gb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9, "cuda max allocated"
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
    if a.schedule == "cosine":
        keys.append("steps")  # the cosine's length; a constant schedule may be extended by a larger --steps
    cfg = {k: getattr(a, k) for k in keys}
    cfg["global_batch"] = a.batch_size * a.grad_accum * world  # the number of ranks itself may change
    return cfg


def build_model(a, tokenizer, device, distributed):
    """The model with LoRA (or all parameters) trainable, trainable tensors fp32, frozen ones in the compute dtype."""
    frozen_dtype = torch.bfloat16 if a.bf16 else torch.float32
    torch.manual_seed(a.seed)  # the same random init (and LoRA init) on every rank
    if a.from_scratch:
        args = preset(a.from_scratch, vocab_size=tokenizer.vocab_size, max_seq_len=a.ctx)
        model = Transformer(args)
    elif a.preset:
        model = Transformer(preset(a.preset, vocab_size=tokenizer.vocab_size))
    else:
        # Straight to this rank's device: fully_shard then shards in place and frees the full copy, instead of
        # every rank holding a converted copy of the whole model in host RAM at once.
        model = Transformer.from_pretrained(a.model, dtype=frozen_dtype, device=device)
    args = model.args
    if args.vocab_size < tokenizer.vocab_size:
        raise UsageError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only {args.vocab_size} embeddings")
    if not a.from_scratch and a.ctx > args.max_seq_len:
        # Position interpolation (LongLoRA): squeeze ctx positions into the range the model was trained on.
        original = round(args.max_seq_len / args.rope_scaling)
        args.rope_scaling = float(math.ceil(a.ctx / original))
        args.max_seq_len = a.ctx
    args.attn, args.group_size, args.sink_tokens, args.shift_wrap = a.attn, a.group_size, a.sink_tokens, a.shift_wrap
    if a.from_scratch:
        model.requires_grad_(True)
    else:
        apply_lora(model, r=a.lora_r, alpha=a.lora_alpha, dropout=a.lora_dropout, targets=a.lora_targets)
        mark_trainable(model, embed=not a.no_train_embed, norms=not a.no_train_norms)
    for p in model.parameters():
        p.data = p.data.float() if p.requires_grad else p.data.to(frozen_dtype)
    model.gradient_checkpointing = not a.no_grad_ckpt
    if distributed:
        shard_model(model, device, a.bf16)
    else:
        model.to(device)
    return model


def load_data(a, tokenizer, local_rank, distributed):
    """(train split, held-out split or None). The local rank 0 of each machine tokenizes; the others wait."""
    cache = a.token_cache or os.path.join(a.out, "tokens")
    kind = "sft" if a.sft else "text"

    def prepare(paths):
        key = hashlib.sha256(json.dumps([sorted(map(os.path.abspath, paths)), kind]).encode()).hexdigest()[:16]
        path = os.path.join(cache, f"{kind}-{key}.bin")

        def run():
            os.makedirs(cache, exist_ok=True)
            (prepare_sft if a.sft else prepare_tokens)(paths, tokenizer, path)

        on_some_ranks(run, local_rank == 0, distributed)  # one tokenizer per machine; the others wait for it
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


def token_loss_sum(model, x, y, lengths, autocast):
    """Sum of the cross-entropy over the target tokens (y != -100) of one micro-batch (fp32)."""
    with autocast:
        logits = model(x, lengths=lengths)  # (B, T, V)
    return F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=-100, reduction="sum")


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
            total += token_loss_sum(model, x.to(device), y.to(device), lengths if lengths is None else lengths.to(device),
                                    autocast).item()
            count += (y != -100).sum().item()
    finally:
        model.args.attn = mode
        model.train()
        if distributed:
            # FSDP2 reshards the root group (embeddings, final norm, output) after backward only; a forward
            # without backward leaves it unsharded, and the next checkpoint would then save bf16 compute
            # copies and fail to match the optimizer's parameters. Reshard explicitly.
            model.reshard()
    total, count = all_sum([total, count], device, distributed)
    return total / max(count, 1)


def train(a):
    rank, local_rank, world, device, distributed = setup_distributed()
    a.bf16 = a.dtype == "bf16" or (a.dtype == "auto" and device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if a.bf16 and not distributed else nullcontext()

    # -- tokenizer, data, model
    tok_path = a.tokenizer or (find_tokenizer(a.model) if a.model else None)
    if not tok_path:
        raise UsageError(f"no tokenizer.model next to --model {a.model}; pass --tokenizer PATH")
    tokenizer = Tokenizer(tok_path)
    train_data, held_data = load_data(a, tokenizer, local_rank, distributed)
    model = build_model(a, tokenizer, device, distributed)
    log0(rank, f"model: {model.num_params() / 1e6:.2f}M parameters, ctx {a.ctx}, rope scaling {model.args.rope_scaling:g}, "
               f"attn {a.attn}, {'bf16' if a.bf16 else 'fp32'}, {world} process(es) on {device.type}" +
               (", FSDP" if distributed else ""))
    log0(rank, f"{'trainable: all parameters (from scratch)' if a.from_scratch else trainable_summary(model)}; "
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
            return None, 0
        ckpt = find_checkpoint(a.resume)
        step = check_checkpoint(ckpt, model, config)["step"]
        if step >= a.steps:
            raise UsageError(f"--resume {ckpt}: the checkpoint is at step {step}, nothing left to do for --steps {a.steps}")
        return ckpt, step

    ckpt, start = broadcast0(on_some_ranks(find_resume, rank == 0, distributed), distributed)
    if ckpt:
        load_checkpoint(ckpt, model, opt, rank, world, distributed)
        log0(rank, f"resumed from {ckpt} at step {start}")

    metrics_path = os.path.join(a.out, "metrics.jsonl")
    if rank == 0:
        os.makedirs(a.out, exist_ok=True)
        old = open(metrics_path).read().splitlines() if os.path.exists(metrics_path) else []
        kept = "".join(line + "\n" for line in old if json.loads(line)["step"] <= start) if a.resume else ""
        atomic_write(metrics_path, lambda f: open(f, "w").write(kept))

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
                "rope_scaling": model.args.rope_scaling, "max_seq_len": model.args.max_seq_len}

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
        for x, y, lengths in micro:
            ls = token_loss_sum(model, x.to(device), y.to(device), None if lengths is None else lengths.to(device), autocast)
            # FSDP averages gradients over ranks; times `world` makes it the sum, / n_target the global token mean.
            (ls * world / max(n_target, 1)).backward()
            loss_sum += ls.detach()
        loss = all_sum([loss_sum.item()], device, distributed)[0] / max(n_target, 1)
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, a.grad_clip if a.grad_clip > 0 else float("inf"))
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
        if step % a.save_every == 0 or step == a.steps:
            save_checkpoint(a.out, step, model, opt, run_state(step), a.keep, rank, world)
    run_eval(step)

    # -- the result: an adapter (LoRA) or a whole model (from scratch), written by rank 0
    tensors = full_trainable_state(model, keep=rank == 0)
    if rank == 0:
        with torch.device("meta"):
            shadow = Transformer(ModelArgs(**asdict(model.args)))
        if not a.from_scratch:
            cfg = model.lora_config
            apply_lora(shadow, r=cfg["r"], alpha=cfg["alpha"], dropout=cfg["dropout"], targets=cfg["targets"])
            mark_trainable(shadow, embed=cfg["embed"], norms=cfg["norms"])
        shadow.load_state_dict(tensors, strict=False, assign=True)  # frozen tensors stay on meta: never read
        if a.from_scratch:
            shadow.args.attn, shadow.args.group_size = "full", None
            shadow.save_pretrained(a.out, tokenizer_path=tok_path)
        else:
            save_adapter(shadow, a.out, ctx=a.ctx, extra={"train_args": {k: v for k, v in vars(a).items()
                                                                         if isinstance(v, (int, float, str, list, type(None)))}})
        log0(rank, f"wrote {'model' if a.from_scratch else 'adapter'} to {a.out}")
    if distributed:
        dist.barrier()
    return 0


# ----------------------------------------------------------------------------------------------------
# Command line


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default unless there is none to show or the help text already says it."""

    def _get_help_string(self, action):
        if action.default in (None, False) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump, and main() returns 2 instead of exiting
        raise UsageError(message)


def build_parser():
    p = Parser(description="Long-context LoRA fine-tuning of LLaMA2 (LongLoRA / SinkLoRA) with FSDP2; "
                           "run with python (one process) or torchrun (several).",
               formatter_class=HelpFormatter, allow_abbrev=False)
    src = p.add_argument_group("model")
    src.add_argument("--model", help="base checkpoint directory (Meta, HF or this project's layout)")
    src.add_argument("--preset", choices=sorted(PRESETS), help="instead of --model: a randomly initialised base of this "
                     "shape (LoRA training; for tests and --estimate)")
    src.add_argument("--from-scratch", metavar="PRESET", choices=sorted(PRESETS),
                     help="full-parameter training of a randomly initialised PRESET (no LoRA, RoPE unscaled, vocabulary "
                          "from --tokenizer); the result is a whole model in model.py's layout")
    src.add_argument("--tokenizer", help="sentencepiece tokenizer.model (default: the one next to --model)")
    d = p.add_argument_group("data")
    d.add_argument("--data", nargs="+", help="training text: files, folders (all files inside) or JSONL/JSON with a "
                   "'text' field; with --sft, JSON/JSONL records {instruction, input?, output}")
    d.add_argument("--sft", action="store_true", help="supervised fine-tuning: LLaMA2 [INST] format, loss on answers only")
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
    lo = p.add_argument_group("LoRA (not with --from-scratch)")
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
    r = p.add_argument_group("output")
    r.add_argument("--out", help="output folder: metrics.jsonl, checkpoints/, and the final adapter or model")
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
    if a.from_scratch and (lora_flags or a.no_train_embed or a.no_train_norms):
        raise UsageError(f"--from-scratch trains every parameter; --{(lora_flags or ['no_train_embed'])[0].replace('_', '-')} does not apply")
    a.lora_r = 8 if a.lora_r is None else a.lora_r
    a.lora_alpha = 16.0 if a.lora_alpha is None else a.lora_alpha
    a.lora_dropout = 0.0 if a.lora_dropout is None else a.lora_dropout
    a.lora_targets = list(DEFAULT_TARGETS) if a.lora_targets is None else a.lora_targets
    for flag in ("ctx", "steps", "batch_size", "grad_accum", "save_every", "keep", "log_every", "gpus", "lora_r"):
        if getattr(a, flag) < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(a, flag)}")
    for flag in ("warmup", "eval_every", "eval_samples", "weight_decay", "grad_clip", "sink_tokens"):
        if getattr(a, flag) < 0:
            raise UsageError(f"--{flag.replace('_', '-')} must be >= 0, got {getattr(a, flag)}")
    if not a.lr > 0:
        raise UsageError(f"--lr must be > 0, got {a.lr}")
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
    if a.resume and not os.path.isdir(a.resume):
        raise UsageError(f"--resume {a.resume}: no such directory")


def run_estimate(a):
    if a.model:
        m, name = config_args(a.model), a.model
    else:
        name = a.preset or a.from_scratch or "llama2-7b"
        m = preset(name)
    e = estimate(m, a.ctx, a.attn, a.gpus, a.batch_size, a.grad_accum, a.lora_r, a.lora_targets,
                 not a.no_train_embed, not a.no_train_norms, full=bool(a.from_scratch), group_size=a.group_size,
                 sinks=a.sink_tokens)
    print(format_estimate(e, name, a.ctx, a.attn, a.gpus, a.batch_size, a.grad_accum, bool(a.from_scratch)))
    return 0


def main(argv=None) -> int:
    rank = int(os.environ.get("RANK", "0"))
    try:
        a = build_parser().parse_args(argv)
        if a.estimate and not (a.model or a.preset or a.from_scratch):
            a.preset = "llama2-7b"
        check_args(a)
        return run_estimate(a) if a.estimate else train(a)
    except (UsageError, CheckpointError, FileNotFoundError, ValueError) as e:
        if rank == 0:
            print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if dist.is_available() and dist.is_initialized() and "WORLD_SIZE" in os.environ:
            dist.destroy_process_group()


if __name__ == "__main__":
    code = main()
    if "WORLD_SIZE" in os.environ:
        # Under torchrun, leave without the interpreter's shutdown (main() has already destroyed the
        # process group; every file is written and closed). Why: gloo runs collectives on its own C++
        # threads, and a thread drops its last reference to a finished collective a moment *after* the
        # caller's wait() returns; the final barrier even keeps the collectives still in flight when it was
        # called (often the last all-gather of the adapter on rank 1), freeing them only when the barrier
        # itself is freed. Freeing them releases their Python-owned tensors, which takes the GIL.
        # destroy_process_group() does not stop gloo's threads, and DTensor/FSDP internals keep the group
        # alive, so the threads outlive main(). If the interpreter is already shutting down, Python 3.11
        # ends a thread that asks for the GIL with pthread_exit; that unwinds through a C++ destructor and
        # std::terminate aborts the rank ("terminate called without an active exception", exit -6) after a
        # run that succeeded (~1 in 30 torchrun runs on 2 CPU ranks). os._exit ends the process without
        # that shutdown, so a gloo thread can never be caught half-way; nothing left needs it.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
