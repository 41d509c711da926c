"""
The process group and FSDP2 for train.py: setup_distributed and the collectives train.py agrees
through, then shard a model built on the meta device, then fill it from a checkpoint, each rank
reading only its own shard of each tensor.

    args, weights = read_checkpoint(path, ModelArgs)              # weights.py: configs and indexes only
    with torch.device("meta"): model = Transformer(args)          # no memory
    apply_lora(model); mark_trainable(model); set dtypes           # still no memory
    shard_model(model, device, bf16)                               # DTensors on meta, 1/W of each tensor per rank
    load_weights(model, weights, device, lora_init, path)         # each rank reads its rows, one block at a time

Why each rank reads its own rows instead of rank 0 reading and broadcasting (set_model_state_dict with
full_state_dict=True, broadcast_from_rank0=True, PyTorch's standard route): given a whole-model state dict,
that route holds the whole model in rank 0's host memory (138 GB for LLaMA2-70B), and fed one tensor at a time
it still moves every byte through rank 0 and then over the network to all W ranks. Here every rank opens the
memory-mapped files itself and reads just the rows of dim 0 that FSDP2 gives it (rank r of W holds rows
[r·c, (r+1)·c) of an n-row tensor, c = ceil(n / W)): no communication at all, each byte is read from disk once
per node, and besides its shard (on its device) a rank's host memory holds one block's rows at a time (a row
slice of Meta's dim-1-split matrices is joined from its pieces; HF's q/k rows are permuted, so those are read
whole, one tensor at a time). Files are opened per block and released after, so no more than one block's pages
stay mapped. The price: every machine must see the checkpoint (as every rank already had to before).

Strict as Transformer.from_pretrained: every rank checks the names and shapes against the model before reading
(the same files give the same error everywhere; train.py also gathers every rank's outcome, so no rank waits
for another). The LoRA matrices are not in the checkpoint: `lora_init_values` draws their full initial values
on the CPU, so one process and W ranks start from the same numbers.
"""

import datetime
import math
import os
import re

import torch
import torch.distributed as dist

from longlora.cli import USER_ERRORS, UsageError, one_line
from lora import init_lora_, lora_modules
from longlora.weights import CheckpointError, check_state_dict


# torchrun sets RANK / LOCAL_RANK / WORLD_SIZE; without them train.py runs in one process

# FSDP2 takes frozen bf16 and trainable fp32 parameters in one unit (a LoRA block) from torch 2.8 on: before it,
# fully_shard asked one dtype of every parameter of a unit (FSDPParamGroup._init_mp_dtypes: "FSDP expects uniform
# original parameter dtype"); 2.8 asks it of the trainable ones only.
FSDP_TORCH = (2, 8)


def check_torch_version(version: str):
    """Under torchrun, before anything is loaded: a torch too old for FSDP2 here is one error line, not an
    AssertionError at the first forward."""
    found = re.match(r"(\d+)\.(\d+)", version)
    if found is None or tuple(map(int, found.groups())) < FSDP_TORCH:
        raise UsageError(f"training under torchrun needs torch >= {'.'.join(map(str, FSDP_TORCH))} (FSDP2 with frozen bf16 "
                         f"and trainable fp32 parameters in one unit); this is torch {version}: install a newer build "
                         "for your CUDA (https://pytorch.org/get-started/locally/)")


def setup_distributed():
    """(rank, local_rank, world, device, distributed, wait_group)."""
    if "WORLD_SIZE" not in os.environ:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return 0, 0, 1, device, False, None
    check_torch_version(torch.__version__)
    rank, local_rank, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():  # the default timeout: a rank that stops is noticed within minutes, not hours
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    # On the first run local rank 0 tokenizes the whole dataset while the others wait, which can take longer than
    # NCCL's 10-minute default: that one wait happens in a group of its own (gloo: on the CPU) with a long timeout.
    wait_group = dist.new_group(backend="gloo", timeout=datetime.timedelta(hours=4))
    return rank, local_rank, world, device, True, wait_group


def all_sum(values, device, distributed):
    """Sum a list of floats over all ranks (fp64, so token counts stay exact)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if distributed:
        dist.all_reduce(t)
    return t.tolist()


def on_some_ranks(fn, here, distributed, group=None):
    """Run fn() on the ranks where `here` is true, and make every rank agree on the outcome: if it failed
    anywhere, all ranks raise the same UsageError (instead of the others waiting forever at a collective).
    Returns fn's result where it ran, else None. `group`: the process group to agree in (default: the world)."""
    result, err = None, None
    if here:
        try:
            result = fn()
        except USER_ERRORS as e:
            err = one_line(e)
    if distributed:
        errs = [None] * dist.get_world_size()
        dist.all_gather_object(errs, err, group=group)
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


# FSDP2 and sharded loading


def shard_model(model, device, bf16):
    """FSDP2: each TransformerBlock becomes one all-gather/reduce-scatter unit, and so do tok_embeddings and
    output; the root holds the rest (the final norm). Parameters become DTensors sharded on dim 0 across the ranks.

    The embeddings and the output projection are units of their own (unless tied: one parameter cannot be in two
    units) so that FSDP reshards them after their forward: in the root's unit they would stay gathered from
    forward to the end of backward (2 x vocab x dim bf16 numbers, 1 GB for LLaMA2-70B), through every block's
    backward, where the activation peak is. The output projection runs once per chunk of the loss, so it is
    all-gathered for each chunk, in forward and again in backward.

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
    if not model.args.tie_embeddings:
        fully_shard(model.tok_embeddings, mesh=mesh, mp_policy=mp)
        fully_shard(model.output, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)  # parameters on meta stay there, as DTensors, until load_weights
    return model


def shard_rows(n, rank, world):
    """(start, end): the rows of an n-row tensor that FSDP2's dim-0 Shard places on `rank` (torch.chunk's split)."""
    c = math.ceil(n / world)
    return min(rank * c, n), min((rank + 1) * c, n)


def lora_init_values(model):
    """{name: full CPU tensor}: the initial LoRA matrices of a model on the meta device, drawn as LoRALinear draws
    them, from the CPU generator in module order; the same numbers on every rank and in one process."""
    out = {}
    for name, m in lora_modules(model):
        a, b = torch.empty(m.lora_a.shape), torch.empty(m.lora_b.shape)
        init_lora_(a, b)
        out[name + ".lora_a"], out[name + ".lora_b"] = a, b
    return out


def load_weights(model, weights, device, lora_init, where):
    """Fill a model built on the meta device (plain, or sharded by shard_model) from `weights` (weights.Weights)
    plus `lora_init` ({name: full tensor} for what the checkpoint does not hold). Each parameter keeps the dtype
    it has on meta; the checkpoint's tensors are converted straight from their own dtype (an fp16 embedding
    becomes fp32 exactly, never through bf16)."""
    from torch.distributed.tensor import DTensor

    params = dict(model.named_parameters())  # a tied output weight is tok_embeddings' (one entry)
    expected = {k: tuple(p.shape) for k, p in params.items() if k not in lora_init}
    check_state_dict(weights.specs, expected, where)
    sharded = {k for k, p in params.items() if isinstance(p, DTensor)}
    rank, world = (dist.get_rank(), dist.get_world_size()) if sharded else (0, 1)
    # Buffers (none today: RoPE's angles are computed in forward) would come out of to_empty uninitialised and
    # would have to be recomputed after it; refuse rather than train on garbage.
    if next(model.buffers(), None) is not None:
        raise NotImplementedError("load_weights: the model has buffers; compute them after to_empty")
    model.to_empty(device=device)  # FSDP2 re-points each DTensor at its (padded) local shard
    if model.args.tie_embeddings:  # to_empty made the shared parameter two: tie them again
        model.output.weight = model.tok_embeddings.weight
    params = dict(model.named_parameters())

    def rows(name, shape):
        return shard_rows(shape[0], rank, world) if name in sharded else (0, shape[0])

    # One block at a time; the root's tensors (the embeddings and output, the largest) first, while little of the
    # shard is resident yet.
    groups = [[k for k in params if not k.startswith("layers.")]]
    groups += [[k for k in params if k.startswith(f"layers.{i}.")] for i in range(len(model.layers))]
    with torch.no_grad():
        for group in groups:
            read = weights.read([k for k in group if k not in lora_init], rows)
            for name in group:
                src = lora_init[name][slice(*rows(name, lora_init[name].shape))] if name in lora_init else read.pop(name)
                local = params[name].to_local() if name in sharded else params[name]
                if local.shape != src.shape:  # FSDP2 split differently than shard_rows assumes: never silently
                    raise CheckpointError(f"{where}: {name}: local shard {tuple(local.shape)}, read {tuple(src.shape)}")
                local.copy_(src)
