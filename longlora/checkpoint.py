"""
Checkpoints: save a training run's state atomically, find it again, check it fits, and load it (under
FSDP or in one process). train.py calls these; a reader looking for "what is on disk" starts here.

    out/checkpoints/step-NNNNNN/
        trainable.safetensors   LoRA: the trainable tensors, gathered to full fp32 (DTensor.full_tensor())
        optimizer.pt            LoRA: AdamW's state, get_optimizer_state_dict(full_state_dict=True, cpu_offload=True)
        dcp/                    --full, --from-scratch instead: weights and AdamW's state in torch.distributed.checkpoint's
                                format, each rank writing its own shard of each tensor: .metadata (what is where)
                                and one __RANK_I.distcp file per tensor shard
        rng.pt                  every rank's CPU (and CUDA) RNG state
        state.json              step, samples seen, RoPE scaling and context, the run's training config;
                                written last: its presence means "complete"

Two formats, because the trainable state differs in size by a factor of 100. LoRA+ trains 0.4% of the numbers at
70B (0.30B: 3.6 GB with AdamW's moments): rank 0 gathers them whole into files that the adapter reader opens
directly (adapter.checkpoint_as_adapter), and only rank 0's machine needs to see the disk. Full fine-tuning trains
all of them (830 GB at 70B): no process can hold that, so every rank writes its own shard (dcp.save of the sharded
get_state_dict; no gather), one file per tensor shard so that a rank's host memory holds one tensor at a time on its
way from the GPU (DCP keeps all of a file's tensors until the file is complete), and every rank must see the
folder (a shared file system across machines).

The directory is written under a temporary name (.tmp-step-NNNNNN-PID, PID rank 0's), fsynced, and renamed by rank 0
when complete: DCP's coordination runs in the long-timeout gloo group, and dcp.save returns on rank 0 only after
every rank has written and fsynced its files (it gathers their write results before writing .metadata); rng.pt and
state.json come after. Older checkpoints beyond --keep are deleted only afterwards, so a run killed at any moment
leaves the previous checkpoint loadable. Resuming (train.py --resume DIR: a checkpoint, or a run folder and its
newest complete checkpoint) first checks that the run's config matches (model, data, ctx, attention, LoRA,
optimizer, schedule, seed, global batch; the number of GPUs may change if the global batch stays the same) and
that every file is whole (a DCP shard: present and as long as .metadata says); then, LoRA: rank 0 reads the files
and FSDP broadcasts them to the shards (set_model_state_dict / set_optimizer_state_dict with broadcast_from_rank0);
DCP: every rank reads the pieces of its own shards (dcp.load resharding to this run's ranks, or to one process).
"""

import json
import os
import shutil
import warnings

import torch
import torch.distributed as dist

from longlora.cli import one_line
from longlora.weights import CheckpointError
from longlora.shard import broadcast0


# One process writes and reads DCP's format too (a single rank of it); DCP warns each time that it assumes so.
warnings.filterwarnings("ignore", "torch.distributed is disabled, unavailable or uninitialized, assuming")


class DamagedCheckpoint(CheckpointError):
    """A checkpoint whose files cannot be read (truncated, overwritten): the message names the file."""


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
        raise CheckpointError(f"--resume {path}: no complete checkpoint there (expected state.json or checkpoints/step-*)")
    return found[-1]


def sharded(model):
    """Whether a model's checkpoints are in DCP's sharded format: every parameter trains (--full, --from-scratch;
    see the docstring)."""
    return all(p.requires_grad for p in model.parameters())


def save_checkpoint(run_dir, step, model, opt, state, keep, rank, world, group=None):
    """Write checkpoint `step` atomically: into checkpoints/.tmp-step-N-PID, then one rename by rank 0. All ranks
    call this (gathering the LoRA tensors, or writing their DCP shards); `group`: the long-timeout process group in
    which the ranks wait for each other's writes. Older checkpoints beyond `keep` are deleted only after the new one
    is in place."""
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    rng = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
    rngs = [None] * world
    if world > 1:
        dist.all_gather_object(rngs, rng)
    else:
        rngs = [rng]
    root = os.path.join(run_dir, "checkpoints")
    final = os.path.join(root, f"step-{step:06d}")
    tmp = os.path.join(root, f".tmp-step-{step:06d}-{os.getpid()}")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    tmp = broadcast0(tmp, world > 1)  # rank 0's name, made before any rank writes into it
    if sharded(model):
        save_shards(os.path.join(tmp, "dcp"), model, opt, group)
    else:
        tensors = full_trainable_state(model, keep=rank == 0)
        optim = get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank == 0:
            save_file(tensors, os.path.join(tmp, "trainable.safetensors"), metadata={"format": "pt"})
            torch.save(optim, os.path.join(tmp, "optimizer.pt"))
    if rank == 0:
        torch.save(rngs, os.path.join(tmp, "rng.pt"))
        with open(os.path.join(tmp, "state.json"), "w") as f:  # written last: its presence means "complete"
            json.dump(state, f, indent=1)
        for name in os.listdir(tmp):  # data on disk before the rename makes it visible (DCP fsyncs its own)
            if os.path.isfile(os.path.join(tmp, name)):
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
    if world > 1:  # deleting old checkpoints of 100s of GB can take longer than the default timeout
        dist.barrier(group=group)


def save_shards(path, model, opt, group):
    """dcp.save of the sharded weights and AdamW state: each rank writes its own shards, one file per tensor shard.
    Returns when every rank's files are written and fsynced (and .metadata, by rank 0)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    weights, optim = get_state_dict(model, opt)  # DTensors: each rank's own shard, nothing gathered
    dcp.save({"model": weights, "optim": optim}, process_group=group,
             storage_writer=dcp.FileSystemWriter(path, single_file_per_rank=False))


def check_shards(ckpt):
    """The names of the weights in a DCP checkpoint's .metadata, after checking that every file it points to is there
    and long enough: DamagedCheckpoint naming the first that is not (a kill or a full disk mid-write, a lost file)."""
    from torch.distributed.checkpoint import FileSystemReader

    path = os.path.join(ckpt, "dcp")
    try:
        meta = FileSystemReader(path).read_metadata()
        names = {k.removeprefix("model.") for k in meta.state_dict_metadata if k.startswith("model.")}
    except Exception as e:  # missing, truncated, not DCP's
        raise DamagedCheckpoint(f"{path}/.metadata: cannot read it ({type(e).__name__}: {one_line(e)})") from None
    needed = {}
    for info in meta.storage_data.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        have = os.path.getsize(os.path.join(path, name)) if os.path.isfile(os.path.join(path, name)) else None
        if have is None or have < size:
            raise DamagedCheckpoint(f"{path}/{name}: " + ("missing" if have is None else f"{have} bytes, .metadata "
                                                          f"expects {size} (truncated)"))
    return names


def read_checkpoint_file(ckpt, name):
    """One file of a checkpoint, read whole: a truncated or foreign file raises DamagedCheckpoint naming it."""
    from safetensors.torch import load_file

    path = os.path.join(ckpt, name)
    try:
        return load_file(path) if name.endswith(".safetensors") else torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a damaged file can fail in any of the readers' own ways
        raise DamagedCheckpoint(f"{path}: cannot read it ({type(e).__name__}: {one_line(e)})") from None


def read_checkpoint_files(ckpt, model):
    """(trainable tensors, optimizer state, RNG states) of a checkpoint (read_checkpoint_file); in DCP's format the
    first two are None: every rank reads its own shards (load_checkpoint)."""
    if sharded(model):
        return None, None, read_checkpoint_file(ckpt, "rng.pt")
    return tuple(read_checkpoint_file(ckpt, name) for name in ("trainable.safetensors", "optimizer.pt", "rng.pt"))


def find_resumable(path, model, config, say):
    """(checkpoint dir, its state.json, its files read by read_checkpoint_files) to resume from: `path` itself,
    or the newest checkpoint of the run folder `path` whose files all read back. A damaged newest checkpoint is
    reported by `say` and the previous one is used; a checkpoint of another config is refused (CheckpointError)."""
    if os.path.exists(os.path.join(path, "state.json")):
        candidates = [path]
    else:
        candidates = checkpoint_dirs(path)[::-1] or [find_checkpoint(path)]  # (find_checkpoint raises: none there)
    for i, ckpt in enumerate(candidates):
        try:
            state = check_checkpoint(ckpt, model, config)
            return ckpt, state, read_checkpoint_files(ckpt, model)
        except DamagedCheckpoint as e:
            if i + 1 == len(candidates):
                raise CheckpointError(f"--resume {path}: {e}; no older complete checkpoint to fall back on") from None
            say(f"warning: {e}; resuming from the previous checkpoint {candidates[i + 1]} instead")


def load_checkpoint(ckpt, files, model, opt, rank, world, distributed, group=None):
    """Load trainable weights, optimizer state and RNG into an (FSDP-sharded or plain) model. Rank 0 passes the
    files it read (read_checkpoint_files), the other ranks None. LoRA: under FSDP the tensors are broadcast from
    rank 0, so other machines need not see the disk. DCP: every rank reads its shards from `ckpt` (resharded from
    the saving run's ranks to this run's), coordinating in `group`."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_state_dict, set_model_state_dict,
                                                         set_optimizer_state_dict, set_state_dict)

    tensors, optim, rngs = files if rank == 0 else ({}, {}, None)
    if sharded(model):
        import torch.distributed.checkpoint as dcp

        weights, optim = get_state_dict(model, opt)  # this run's shards, to be filled in place
        dcp.load({"model": weights, "optim": optim}, checkpoint_id=os.path.join(ckpt, "dcp"), process_group=group)
        set_state_dict(model, opt, model_state_dict=weights, optim_state_dict=optim)
    elif distributed:
        opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)
        set_model_state_dict(model, tensors, options=opts)
        set_optimizer_state_dict(model, opt, optim, options=opts)
    else:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.requires_grad:
                    p.copy_(tensors[name])
        set_optimizer_state_dict(model, opt, optim, options=StateDictOptions(full_state_dict=True))
    rngs = broadcast0(rngs, distributed)  # rank 0's RNG states to every rank
    if len(rngs) == world:  # same number of ranks: every rank continues its own random stream
        torch.set_rng_state(rngs[rank]["cpu"])
        if torch.cuda.is_available() and rngs[rank]["cuda"] is not None:
            torch.cuda.set_rng_state(rngs[rank]["cuda"])


def read_state(ckpt):
    """A checkpoint's state.json; DamagedCheckpoint naming it if it is not one."""
    path = os.path.join(ckpt, "state.json")
    try:
        with open(path) as f:
            state = json.load(f)
        if not (isinstance(state, dict) and isinstance(state.get("step"), int) and isinstance(state.get("config"), dict)):
            raise ValueError("expected a JSON object with an integer step and a config")
    except (OSError, ValueError) as e:
        raise DamagedCheckpoint(f"{path}: not a checkpoint's state ({type(e).__name__}: {one_line(e)})") from None
    return state


PATH_KEYS = ("model", "data", "eval_data")  # a run's config values that name files: compared by real path


def comparable(key, value):
    """A config value as resume compares it: a path (or list of paths) by its real path, so that `--model base`
    and `--model /abs/base` (or a symlink to it) are one model. state.json holds real paths; one written with the
    path as typed is read the same way (a relative one from the current folder)."""
    if key not in PATH_KEYS or value is None:
        return value
    return [os.path.realpath(p) for p in value] if isinstance(value, list) else os.path.realpath(value)


def check_checkpoint(ckpt, model, config):
    """One-line CheckpointError if the checkpoint was written by a run with a different training config, or
    does not hold exactly this model's trainable tensors. Returns its state.json."""
    from safetensors import safe_open

    state = read_state(ckpt)
    for k, v in config.items():
        if comparable(k, state["config"].get(k)) != comparable(k, v):
            raise CheckpointError(f"--resume {ckpt}: it was trained with {k}={state['config'].get(k)!r}, this run has "
                             f"{k}={v!r}; resuming needs the same training config")
    if sharded(model):  # every tensor trains: the whole state dict (a tied output matrix under both names)
        have, want = check_shards(ckpt), set(model.state_dict())
    else:
        try:
            with safe_open(os.path.join(ckpt, "trainable.safetensors"), framework="pt") as f:
                have = set(f.keys())
        except Exception as e:  # truncated: safetensors' own error types
            raise DamagedCheckpoint(f"{ckpt}/trainable.safetensors: cannot read it ({one_line(e)})") from None
        want = {n for n, p in model.named_parameters() if p.requires_grad}
    if have != want:
        diff = sorted(have ^ want)[0]
        raise CheckpointError(f"--resume {ckpt}: tensor {diff} is {'missing' if diff in want else 'unexpected'}; "
                         "the checkpoint does not fit this model")
    return state
