"""
Reading checkpoint files: Meta's (`params.json` + `consolidated.NN.pth`), HF's (`config.json` + `*.safetensors`,
one file or several) and this project's (`params.json` + `model.safetensors`), all into Meta's names.

    args, weights = read_checkpoint("llama-2-7b")        # reads the configs and the files' indexes, no tensor data
    weights.specs["tok_embeddings.weight"]               # shape and dtype, as a meta tensor
    weights.read(["norm.weight", "output.weight"])       # {name: tensor}, read now

Nothing is read before it is asked for, and then only what is asked for: every file is memory-mapped, and
`read(names, rows)` can read just some rows of dim 0 of each tensor. Transformer.from_pretrained reads everything;
under FSDP each rank reads its own rows, one block at a time (shard.py), so a 70B model is never whole in any
process's memory. Meta's model-parallel shards are joined here tensor by tensor.
"""

import glob
import os
from collections import namedtuple
from dataclasses import fields

import torch

from cli import one_line
from model import CheckpointError, ModelArgs, _read_json, hf_config_to_args, hf_key_map, hf_to_meta_qk

# specs[name]: the tensor's shape and dtype as a meta tensor. read(names, rows=None) -> {name: tensor}: a group of
# tensors, each file opened once and released after, so no file stays mapped beyond the group; rows(name, shape)
# -> (start, end) limits each tensor to those rows of dim 0.
Weights = namedtuple("Weights", "specs read")


def _rows(t, rows, name):
    return t if rows is None else t[slice(*rows(name, t.shape))]


def checkpoint_layout(path):
    """Which layout the directory `path` holds: "meta", "own" or "hf" (read_checkpoint's dispatch)."""
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such file or directory")
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: expected a directory holding a checkpoint")
    has = lambda name: os.path.exists(os.path.join(path, name))
    found = [layout for layout, present in (("meta", glob.glob(os.path.join(path, "consolidated.*.pth"))),
             ("own", has("params.json") and has("model.safetensors")), ("hf", has("config.json"))) if present]
    if len(found) > 1:  # e.g. a leftover consolidated.00.pth beside a newer config.json: which one is meant?
        raise CheckpointError(f"{path}: holds two checkpoint layouts ({' and '.join(found)}); move one of them elsewhere")
    if found:
        return found[0]
    if has("params.json"):
        raise CheckpointError(f"{path}: params.json but no consolidated.NN.pth shards or model.safetensors")
    if glob.glob(os.path.join(path, "*.safetensors")):
        raise CheckpointError(f"{path}: safetensors files but no config.json")
    raise CheckpointError(f"{path}: not a checkpoint directory (expected Meta's params.json + consolidated.NN.pth, "
                          "or HF's config.json + *.safetensors)")


def read_checkpoint(path):
    """(ModelArgs, Weights in Meta's names) from any supported directory."""
    layout = checkpoint_layout(path)
    try:
        return {"meta": read_meta, "own": read_own, "hf": read_hf}[layout](path)
    except CheckpointError:
        raise
    except (KeyError, ValueError, TypeError) as e:  # a config lacking a field, or with values that make no model
        config = os.path.join(path, "config.json" if layout == "hf" else "params.json")
        raise CheckpointError(f"{config}: " + (f"no field {e}" if isinstance(e, KeyError) else one_line(e))) from None


def read_own(path):
    params = _read_json(os.path.join(path, "params.json"))
    known = {f.name for f in fields(ModelArgs)}
    unknown = sorted(set(params) - known)
    if unknown:
        raise CheckpointError(f"{path}/params.json: unknown field {unknown[0]}")
    return ModelArgs(**params), _read_safetensors([os.path.join(path, "model.safetensors")], lambda k: (k, None))


def read_meta(path):
    """Meta's layout. Model-parallel shards split each matrix across files; merge them back, one tensor at a time.

    Row-parallel layers were split on their input (dim 1): tok_embeddings, wo, w2. Every other matrix was
    split on its output (dim 0). 1-D tensors (the norms) are replicated: take shard 0's.
    """
    params_path = os.path.join(path, "params.json")
    if not os.path.exists(params_path):
        raise CheckpointError(f"{path}: consolidated.NN.pth shards but no params.json")
    params = _read_json(params_path)
    files = sorted(glob.glob(os.path.join(path, "consolidated.*.pth")))
    # Shards are numbered 00 .. N-1: a gap means a missing file, which would silently mis-merge.
    for i, f in enumerate(files):
        if os.path.basename(f) != f"consolidated.{i:02d}.pth":
            raise CheckpointError(f"{path}: missing shard consolidated.{i:02d}.pth ({len(files)} shards found)")

    def load():  # memory-mapped: reading the index costs no tensor data
        shards = []
        for f in files:
            try:
                shards.append(torch.load(f, map_location="cpu", mmap=True, weights_only=True))
            except Exception as e:  # a truncated or foreign file: say which one
                raise CheckpointError(f"{f}: cannot read shard ({type(e).__name__}: {str(e).splitlines()[0]})") from None
        return shards

    def cat_dim(key, parts):  # None: not split across the shards
        if parts[0].ndim == 1 or len(parts) == 1:
            return None
        return 1 if key == "tok_embeddings.weight" or key.endswith(("attention.wo.weight", "feed_forward.w2.weight")) else 0

    def read(names, rows=None):
        shards, out = load(), {}
        for key in names:
            parts, dim = [s[key] for s in shards], cat_dim(key, [s[key] for s in shards])
            if dim is None:
                out[key] = _rows(parts[0], rows, key).clone()
            elif dim == 1 or rows is None:
                out[key] = torch.cat([_rows(p, rows, key) for p in parts], dim=dim)
            else:  # rows of a matrix split on dim 0: only the parts that hold them
                start, end = rows(key, (sum(p.shape[0] for p in parts), *parts[0].shape[1:]))
                offsets = [sum(p.shape[0] for p in parts[:i]) for i in range(len(parts))]
                out[key] = torch.cat([p[max(start - o, 0):max(end - o, 0)] for p, o in zip(parts, offsets)])
        return out  # the shards' memory maps close here: no file stays mapped beyond the group

    specs = {}
    shards = load()
    for key in shards[0]:
        if key == "rope.freqs":  # a derived buffer some Meta checkpoints carry
            continue
        parts = [s.get(key) for s in shards]
        if any(p is None for p in parts):
            raise CheckpointError(f"{path}: tensor {key} is missing from shard {parts.index(None):02d}")
        dim, shape = cat_dim(key, parts), list(parts[0].shape)
        if dim is not None:
            shape[dim] = sum(p.shape[dim] for p in parts)
        specs[key] = torch.empty(shape, dtype=parts[0].dtype, device="meta")
    for i, s in enumerate(shards[1:], 1):
        extra = sorted(set(s) - set(shards[0]))
        if extra:
            raise CheckpointError(f"{path}: unexpected tensor {extra[0]} in shard {i:02d}")
    del shards
    vocab = params.get("vocab_size", -1)
    if vocab is None or vocab <= 0:  # Meta's params.json says -1: the tokenizer decides; read it off the weights
        vocab = specs["tok_embeddings.weight"].shape[0] if "tok_embeddings.weight" in specs else 32000
    args = ModelArgs(
        dim=params["dim"], n_layers=params["n_layers"], n_heads=params["n_heads"],
        n_kv_heads=params.get("n_kv_heads"), vocab_size=vocab, multiple_of=params.get("multiple_of", 256),
        ffn_dim_multiplier=params.get("ffn_dim_multiplier"), norm_eps=params.get("norm_eps", 1e-5),
        rope_theta=params.get("rope_theta", 10000.0), rope_scaling=params.get("rope_scaling", 1.0),
        max_seq_len=params.get("max_seq_len", 4096), original_max_seq_len=params.get("original_max_seq_len"),
    )
    # params.json does not say how many shards there were; a lost last shard shows up as short matrices.
    wq = specs.get("layers.0.attention.wq.weight")  # (dim, dim); a lost shard shortens dim 0 only
    if wq is not None and wq.shape[1] != args.dim:
        raise CheckpointError(f"{path}: params.json says dim {args.dim}, the weights have {wq.shape[1]} (another model's params.json?)")
    if wq is not None and wq.shape[0] < args.dim:
        raise CheckpointError(f"{path}: layers.0.attention.wq.weight has {wq.shape[0]} rows but params.json says dim "
                              f"{args.dim}: a consolidated.NN.pth shard is missing ({len(files)} found)")
    return args, Weights(specs, read)


def read_hf(path):
    args = hf_config_to_args(_read_json(os.path.join(path, "config.json")), f"{path}/config.json")
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: no weight_map")
        names = sorted(set(weight_map.values()))
        files = [os.path.join(path, n) for n in names]
        for f in files:
            if not os.path.exists(f):
                raise CheckpointError(f"{path}: missing shard {os.path.basename(f)} named in model.safetensors.index.json")
    else:
        files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
        if not files:
            raise CheckpointError(f"{path}: config.json but no *.safetensors weights")
    names = hf_key_map(args.n_layers)

    def meta_name(k):  # (Meta's name, a fix applied to the whole tensor) or None to skip
        if k.endswith("rotary_emb.inv_freq") or (args.tie_embeddings and k == "lm_head.weight"):
            return None  # a derived buffer old HF checkpoints carry; a tied head is the embedding
        if k not in names:
            raise CheckpointError(f"{path}: unexpected tensor {k}")
        meta = names[k]
        if meta.endswith(("attention.wq.weight", "attention.wk.weight")):
            heads = args.n_heads if meta.endswith("wq.weight") else args.n_kv_heads
            return meta, lambda w: hf_to_meta_qk(w, heads)
        return meta, None

    return args, _read_safetensors(files, meta_name)


def _read_safetensors(files, rename):
    """Weights of safetensors files, memory-mapped: rename(file's name) -> (our name, fix or None) or None."""
    from safetensors import safe_open

    def opened(f):
        try:
            return safe_open(f, framework="pt", device="cpu")
        except Exception as e:  # truncated or corrupt file
            raise CheckpointError(f"{f}: cannot read safetensors file ({str(e).splitlines()[0]})") from None

    specs, where = {}, {}
    for f in files:
        with opened(f) as sf:
            for k in sf.keys():
                named = rename(k)
                if named is None:
                    continue
                sl = sf.get_slice(k)  # the header only: no tensor data is read
                specs[named[0]] = torch.empty(sl.get_shape(), dtype=sl[:0].dtype, device="meta")
                where[named[0]] = (f, k, named[1])

    def read(names, rows=None):
        out = {}
        for f in sorted({where[n][0] for n in names}):
            with opened(f) as sf:
                for name in (n for n in names if where[n][0] == f):
                    _, k, fix = where[name]
                    if fix is not None:  # rows of the fixed tensor: read it whole, one tensor at a time
                        out[name] = _rows(fix(sf.get_tensor(k)), rows, name).clone()
                    else:
                        out[name] = sf.get_slice(k)[slice(*rows(name, specs[name].shape))] if rows else sf.get_tensor(k)
        return out

    return Weights(specs, read)


