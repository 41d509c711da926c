"""
Checkpoint files, in and out: Meta's (`params.json` + `consolidated.NN.pth`), HF's (`config.json` + `*.safetensors`,
one file or several) and this project's (`params.json` + `model.safetensors`), all in Meta's names.

    args, weights = read_checkpoint("llama-2-7b", ModelArgs)   # the configs and the files' indexes, no tensor data
    weights.specs["tok_embeddings.weight"]                    # shape and dtype, as a meta tensor
    weights.read(["norm.weight", "output.weight"])            # {name: tensor}, read now
    write_model(args, state_dict, "out/merged", "hf")         # or "meta", "own"

Nothing is read before it is asked for, and then only what is asked for: every file is memory-mapped, and
`read(names, rows)` can read just some rows of dim 0 of each tensor. Transformer.from_pretrained reads everything
(load_into); under FSDP each rank reads its own rows, one block at a time (longlora/shard.py), so a 70B model is never
whole in any process's memory. Meta's model-parallel shards are joined here tensor by tensor. This file knows the
formats, not the model: the caller passes model.ModelArgs, and a model to fill.
"""

import glob
import itertools
import json
import os
import shutil
import sys
from collections import namedtuple
from dataclasses import asdict, fields

import torch

from longlora.cli import one_line
from longlora.output import atomic_write, write_text
from longlora.tokenizer import Tokenizer, find_tokenizer


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message is one line that names the problem."""


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


def read_checkpoint(path, model_args):
    """(model_args(...), Weights in Meta's names) from any supported directory; model_args is model.ModelArgs."""
    layout = checkpoint_layout(path)
    try:
        config, weights = {"meta": read_meta, "own": read_own, "hf": read_hf}[layout](path)
        if layout == "own":
            unknown = sorted(set(config) - {f.name for f in fields(model_args)})
            if unknown:
                raise CheckpointError(f"{path}/params.json: unknown field {unknown[0]}")
        return model_args(**config), weights
    except CheckpointError:
        raise
    except (KeyError, ValueError, TypeError) as e:  # a config lacking a field, or with values that make no model
        config = os.path.join(path, "config.json" if layout == "hf" else "params.json")
        raise CheckpointError(f"{config}: " + (f"no field {e}" if isinstance(e, KeyError) else one_line(e))) from None


def read_own(path):
    return read_json(os.path.join(path, "params.json")), _read_safetensors([os.path.join(path, "model.safetensors")], lambda k: (k, None))


def read_meta(path):
    """Meta's layout. Model-parallel shards split each matrix across files; merge them back, one tensor at a time.

    Row-parallel layers were split on their input (dim 1): tok_embeddings, wo, w2. Every other matrix was
    split on its output (dim 0). 1-D tensors (the norms) are replicated: take shard 0's.
    """
    params_path = os.path.join(path, "params.json")
    if not os.path.exists(params_path):
        raise CheckpointError(f"{path}: consolidated.NN.pth shards but no params.json")
    params = read_json(params_path)
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
    args = dict(
        dim=params["dim"], n_layers=params["n_layers"], n_heads=params["n_heads"],
        n_kv_heads=params.get("n_kv_heads"), vocab_size=vocab, multiple_of=params.get("multiple_of", 256),
        ffn_dim_multiplier=params.get("ffn_dim_multiplier"), norm_eps=params.get("norm_eps", 1e-5),
        rope_theta=params.get("rope_theta", 10000.0), rope_scaling=params.get("rope_scaling", 1.0),
        max_seq_len=params.get("max_seq_len", 4096), original_max_seq_len=params.get("original_max_seq_len"),
    )
    # params.json does not say how many shards there were; a lost last shard shows up as short matrices.
    wq = specs.get("layers.0.attention.wq.weight")  # (dim, dim); a lost shard shortens dim 0 only
    if wq is not None and wq.shape[1] != args["dim"]:
        raise CheckpointError(f"{path}: params.json says dim {args['dim']}, the weights have {wq.shape[1]} (another model's params.json?)")
    if wq is not None and wq.shape[0] < args["dim"]:
        raise CheckpointError(f"{path}: layers.0.attention.wq.weight has {wq.shape[0]} rows but params.json says dim "
                              f"{args['dim']}: a consolidated.NN.pth shard is missing ({len(files)} found)")
    return args, Weights(specs, read)


def read_hf(path):
    args = hf_config_fields(read_json(os.path.join(path, "config.json")), f"{path}/config.json")
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        weight_map = read_json(index).get("weight_map")
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
    names = hf_key_map(args["n_layers"])

    def meta_name(k):  # (Meta's name, a fix applied to the whole tensor) or None to skip
        if k.endswith("rotary_emb.inv_freq") or (args["tie_embeddings"] and k == "lm_head.weight"):
            return None  # a derived buffer old HF checkpoints carry; a tied head is the embedding
        if k not in names:
            raise CheckpointError(f"{path}: unexpected tensor {k}")
        meta = names[k]
        if meta.endswith(("attention.wq.weight", "attention.wk.weight")):
            heads = args["n_heads"] if meta.endswith("wq.weight") else args["n_kv_heads"]
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


def check_state_dict(state, expected, where):
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing:
        raise CheckpointError(f"{where}: missing tensor {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    if unexpected:
        raise CheckpointError(f"{where}: unexpected tensor {unexpected[0]}" + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""))
    for k, shape in expected.items():
        if tuple(state[k].shape) != shape:
            raise CheckpointError(f"{where}: tensor {k} has shape {tuple(state[k].shape)}, the model expects {shape}")


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read JSON ({e})") from None


# HF's names, one regular expression-free table: Meta name pattern <- HF name pattern.
HF_KEYS = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "layers.{}.attention.wq.weight": "model.layers.{}.self_attn.q_proj.weight",
    "layers.{}.attention.wk.weight": "model.layers.{}.self_attn.k_proj.weight",
    "layers.{}.attention.wv.weight": "model.layers.{}.self_attn.v_proj.weight",
    "layers.{}.attention.wo.weight": "model.layers.{}.self_attn.o_proj.weight",
    "layers.{}.feed_forward.w1.weight": "model.layers.{}.mlp.gate_proj.weight",
    "layers.{}.feed_forward.w2.weight": "model.layers.{}.mlp.down_proj.weight",
    "layers.{}.feed_forward.w3.weight": "model.layers.{}.mlp.up_proj.weight",
    "layers.{}.attention_norm.weight": "model.layers.{}.input_layernorm.weight",
    "layers.{}.ffn_norm.weight": "model.layers.{}.post_attention_layernorm.weight",
}


def hf_key_map(n_layers):
    """{HF name: Meta name} for every tensor of a model with n_layers layers."""
    out = {}
    for meta, hf in HF_KEYS.items():
        if "{}" in meta:
            out.update({hf.format(i): meta.format(i) for i in range(n_layers)})
        else:
            out[hf] = meta
    return out


def hf_to_meta_qk(w, n_heads):
    """Undo HF's q/k row permutation. HF's RoPE rotates halves (d, d + D/2) of each head where Meta rotates
    adjacent pairs (2i, 2i+1); HF's converter reordered the rows of wq and wk so the two agree."""
    out_dim, in_dim = w.shape
    return w.view(n_heads, 2, out_dim // n_heads // 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def meta_to_hf_qk(w, n_heads):
    """The inverse of hf_to_meta_qk: Meta's rows in HF's rotate-half order (used by exports)."""
    out_dim, in_dim = w.shape
    return w.view(n_heads, out_dim // n_heads // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def hf_config_fields(cfg, where="config.json") -> dict:
    """ModelArgs fields from an HF LlamaConfig dict (config.json).

    The context under linear RoPE scaling. transformers reads none off these fields for linear scaling (the
    factor only divides the positions), so two conventions are in use, told apart by one field:
      * `original_max_position_embeddings` present (this project's exports; transformers' meaning for YaRN):
        it is the pre-training context, and `max_position_embeddings` the extended one;
      * absent: our rule, a heuristic that fits LongLoRA's configs, is that `max_position_embeddings` is the
        pre-training context and the context is max_position_embeddings x factor. LongLoRA's fine-tune.py keeps
        `max_position_embeddings` and adds the factor (its released -ft 32k models say 4096 + linear 8), and
        reads a config back the same way (fine-tune.py @d4eb344, lines 121-131: orig_ctx_len =
        max_position_embeddings x factor); transformers' default for YaRN is the same.
    A model that raised max_position_embeddings to its extended context itself (togethercomputer/LLaMA-2-7B-32K:
    32768 + linear 8) reads as 262,144 tokens by that rule: above LLaMA2's 4096 it is ambiguous, and loading
    says so in a warning that names the field to add.
    """
    if cfg.get("model_type", "llama") != "llama":
        raise CheckpointError(f"{where}: model_type {cfg.get('model_type')!r} is not llama")
    if cfg.get("hidden_act", "silu") != "silu" or cfg.get("attention_bias") or cfg.get("mlp_bias"):
        raise CheckpointError(f"{where}: only LLaMA's silu activation without biases is supported")
    n_heads = cfg["num_attention_heads"]
    if cfg.get("head_dim") not in (None, cfg["hidden_size"] // n_heads):
        raise CheckpointError(f"{where}: head_dim {cfg['head_dim']} != hidden_size / num_attention_heads")
    # transformers 4.x writes rope_theta + rope_scaling; 5.x writes rope_parameters holding both.
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "linear"):
        raise CheckpointError(f"{where}: rope type {rope_type!r} is not supported (only linear interpolation)")
    factor = float(rope.get("factor", 1.0)) if rope_type == "linear" else 1.0
    max_pos = cfg.get("max_position_embeddings", 4096)
    original = cfg.get("original_max_position_embeddings") or rope.get("original_max_position_embeddings")
    if factor > 1 and not original and max_pos > 4096 and os.environ.get("LOCAL_RANK", "0") == "0":
        print(f"warning: {where}: the context is read as max_position_embeddings {max_pos} x linear factor {factor:g} = "
              f"{round(max_pos * factor)} tokens (this project's rule for a config without "
              f"original_max_position_embeddings); if {max_pos} is already the extended context, add "
              f'"original_max_position_embeddings": <the pre-training context> to it', file=sys.stderr)
    return dict(
        dim=cfg["hidden_size"], n_layers=cfg["num_hidden_layers"], n_heads=n_heads,
        n_kv_heads=cfg.get("num_key_value_heads") or n_heads, vocab_size=cfg["vocab_size"],
        ffn_hidden_dim=cfg["intermediate_size"], norm_eps=cfg.get("rms_norm_eps", 1e-6),
        rope_theta=rope.get("rope_theta", cfg.get("rope_theta", 10000.0)), rope_scaling=factor,
        max_seq_len=max_pos if original else round(max_pos * factor), original_max_seq_len=original or max_pos,
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
    )


def load_into(model, weights, where, dtype=None, device=None):
    """Fill a model built on the meta device from `weights` (read_checkpoint's), strictly, one block at a time
    (read from the memory-mapped files, converted to dtype/device as they arrive)."""
    tied = model.args.tie_embeddings
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if not (tied and k == "output.weight")}
    check_state_dict(weights.specs, expected, where)
    state = {}
    for _, names in itertools.groupby(weights.specs, key=lambda k: k.split(".")[:2]):  # ["layers", "0"], ...
        state.update({k: v.to(device=device, dtype=dtype if v.is_floating_point() and dtype else v.dtype)
                      for k, v in weights.read(list(names)).items()})
    if tied:
        state["output.weight"] = state["tok_embeddings.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if tied:  # assign=True replaced the shared parameter: tie it again
        model.output.weight = model.tok_embeddings.weight


def check_tokenizer_fits(tokenizer, vocab_size):
    """Its ids must index the embedding, which may hold some padding rows more (256, or 2% of a large vocabulary:
    Qwen2.5 pads 151,665 tokens to 151,936 rows), not thousands."""
    if not vocab_size - max(256, vocab_size // 50) <= tokenizer.vocab_size <= vocab_size:
        raise CheckpointError(f"{tokenizer.path}: a {tokenizer.vocab_size}-token tokenizer does not fit the model's "
                              f"{vocab_size}-token embedding (another model's tokenizer?)")


def load_tokenizer(path, vocab_size):
    """The tokenizer beside the checkpoint `path` (or in its parent folder), checked against the model's
    vocabulary; None when there is none."""
    found = find_tokenizer(path)
    if found is None:
        return None
    tokenizer = Tokenizer(found)
    check_tokenizer_fits(tokenizer, vocab_size)
    return tokenizer


# ----------------------------------------------------------------------------------------------------
# Writing: a whole model in HF, Meta or this project's layout


def hf_config(args, dtype: torch.dtype, tokenizer=None) -> dict:
    """LlamaConfig's fields for these args, written by hand (the product never imports transformers).

    The RoPE scaling is written twice, so that both generations of transformers read it: 4.x reads
    `rope_scaling` + `rope_theta`; 5.x reads `rope_parameters` (and converts a 4.x-style `rope_scaling`,
    which takes precedence, to the same thing). `max_position_embeddings` is the extended context and
    `original_max_position_embeddings` the pre-training one (see hf_config_fields for how both are read).
    It sits at the top level: transformers ignores it there for linear scaling, and warns about it inside
    `rope_scaling`.
    """
    linear = args.rope_scaling != 1.0
    dtype_name = str(dtype).removeprefix("torch.")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": args.dim,
        "intermediate_size": args.hidden_dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads,
        "head_dim": args.head_dim,
        "vocab_size": args.vocab_size,
        "hidden_act": "silu",
        "rms_norm_eps": args.norm_eps,
        "max_position_embeddings": args.max_seq_len,
        "original_max_position_embeddings": args.original_max_seq_len,
        "rope_theta": args.rope_theta,
        "rope_scaling": {"type": "linear", "factor": args.rope_scaling} if linear else None,
        "rope_parameters": ({"rope_type": "linear", "factor": args.rope_scaling, "rope_theta": args.rope_theta} if linear
                            else {"rope_type": "default", "rope_theta": args.rope_theta}),
        "tie_word_embeddings": args.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": (tokenizer.bos_id if tokenizer.bos_id >= 0 else None) if tokenizer else 1,
        "eos_token_id": tokenizer.eos_id if tokenizer else 2,
        "pretraining_tp": 1,
        "use_cache": True,
        "torch_dtype": dtype_name,  # 4.x's name
        "dtype": dtype_name,  # 5.x's name
    }


def meta_to_hf_state(args, state: dict) -> dict:
    """Meta names -> HF names, with wq/wk rows permuted to HF's rotate-half order (see meta_to_hf_qk)."""
    names = {meta: hf for hf, meta in hf_key_map(args.n_layers).items()}
    out = {}
    for k, v in state.items():
        if k == "output.weight" and args.tie_embeddings:
            continue  # HF re-ties lm_head to embed_tokens
        if k not in names:
            raise ValueError(f"cannot export tensor {k}: no HF name for it")
        if k.endswith("attention.wq.weight"):
            v = meta_to_hf_qk(v, args.n_heads)
        elif k.endswith("attention.wk.weight"):
            v = meta_to_hf_qk(v, args.n_kv_heads)
        out[names[k]] = v
    return out


def parse_size(text) -> int:
    """'5GB', '500MB', '40KB' or a number of bytes -> bytes (decimal units, as HF's max_shard_size)."""
    s = str(text).strip().upper()
    for unit, mult in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3), ("B", 1)):
        if s.endswith(unit):
            s, m = s[: -len(unit)], mult
            break
    else:
        m = 1
    try:
        n = int(float(s) * m)
    except ValueError:
        raise ValueError(f"cannot read size {text!r} (expected e.g. 5GB, 500MB or a number of bytes)") from None
    if n <= 0:
        raise ValueError(f"size must be positive, got {text!r}")
    return n


def write_json(path, obj):
    text = json.dumps(obj, indent=2) + "\n"
    write_text(path, text)


def _copy_file(src, dst):
    atomic_write(dst, lambda f: shutil.copyfile(src, f))


def copy_tokenizer(tokenizer, out_dir):
    """The tokenizer's files next to the weights: tokenizer.model or tokenizer.json, and the configs beside it."""
    for name, src in tokenizer.files.items():
        _copy_file(src, os.path.join(out_dir, name))


def write_hf(args, state: dict, out_dir, tokenizer_path=None, shard_size="5GB"):
    """HF layout: config.json, model.safetensors (or model-0000i-of-0000n.safetensors + index), the tokenizer's files."""
    from safetensors.torch import save_file

    hf_state = {k: v.detach().contiguous().cpu() for k, v in meta_to_hf_state(args, state).items()}
    # Greedy sharding in key order, like HF: start a new shard when the next tensor would overflow this one.
    limit, shards, size = parse_size(shard_size), [{}], 0
    for k, v in hf_state.items():
        nbytes = v.numel() * v.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += nbytes
    os.makedirs(out_dir, exist_ok=True)
    if len(shards) == 1:
        files = ["model.safetensors"]
    else:
        files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(files, shards):
        atomic_write(os.path.join(out_dir, name), lambda f, s=shard: save_file(s, f, metadata={"format": "pt"}))
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in hf_state.values())},
                 "weight_map": {k: name for name, shard in zip(files, shards) for k in shard}}
        write_json(os.path.join(out_dir, "model.safetensors.index.json"), index)
    dtype = next(iter(hf_state.values())).dtype
    tok = Tokenizer(tokenizer_path) if tokenizer_path else None
    write_json(os.path.join(out_dir, "config.json"), hf_config(args, dtype, tok))
    if tok:
        copy_tokenizer(tok, out_dir)
    return files


def meta_params(args) -> dict:
    """Meta's params.json. Meta describes the SwiGLU width by multiple_of (+ ffn_dim_multiplier) and
    recomputes it; an HF base states it outright, so find a multiple_of that gives the same width."""
    params = dict(dim=args.dim, n_layers=args.n_layers, n_heads=args.n_heads, n_kv_heads=args.n_kv_heads,
                  vocab_size=args.vocab_size, multiple_of=args.multiple_of, ffn_dim_multiplier=args.ffn_dim_multiplier,
                  norm_eps=args.norm_eps, rope_theta=args.rope_theta)
    meta_width = lambda p: type(args)(dim=p["dim"], n_heads=p["n_heads"], n_kv_heads=p["n_kv_heads"], multiple_of=p["multiple_of"],
                                     ffn_dim_multiplier=p["ffn_dim_multiplier"]).hidden_dim
    if meta_width(params) != args.hidden_dim:
        params.update(multiple_of=args.hidden_dim, ffn_dim_multiplier=None)  # rounds any width <= hidden_dim up to it
        if meta_width(params) != args.hidden_dim:
            raise ValueError(f"SwiGLU width {args.hidden_dim} cannot be written as Meta's multiple_of/ffn_dim_multiplier; "
                             "use --format hf or own")
    # Not in Meta's original params.json: the linear RoPE factor and the contexts, read back by model.py.
    # (Meta's own llama code does not implement position interpolation and rejects unknown fields.)
    params.update(rope_scaling=args.rope_scaling, max_seq_len=args.max_seq_len, original_max_seq_len=args.original_max_seq_len)
    return params


def write_meta(args, state: dict, out_dir, tokenizer_path=None):
    """Meta layout: params.json + one consolidated.00.pth (torch.save of the state dict) + the tokenizer's files."""
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    if args.tie_embeddings:  # Meta has no tied embeddings: store the (identical) output matrix explicitly
        state["output.weight"] = state["tok_embeddings.weight"]
    params = meta_params(args)
    os.makedirs(out_dir, exist_ok=True)
    atomic_write(os.path.join(out_dir, "consolidated.00.pth"), lambda f: torch.save(state, f))
    write_json(os.path.join(out_dir, "params.json"), params)
    if tokenizer_path:
        copy_tokenizer(Tokenizer(tokenizer_path), out_dir)


def write_own(args, state: dict, out_dir, tokenizer_path=None):
    """This project's layout: params.json (every ModelArgs field) + model.safetensors + the tokenizer's files."""
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    if args.tie_embeddings:
        state.pop("output.weight")
    os.makedirs(out_dir, exist_ok=True)
    atomic_write(os.path.join(out_dir, "model.safetensors"), lambda f: save_file(state, f, metadata={"format": "pt"}))
    write_text(os.path.join(out_dir, "params.json"), json.dumps(asdict(args), indent=2))
    if tokenizer_path:
        copy_tokenizer(Tokenizer(tokenizer_path), out_dir)


# A model's files (the glob patterns write_model's layouts use), and those without which none loads: its configs.
MODEL_FILES = ("model.safetensors", "model-*-of-*.safetensors", "model.safetensors.index.json", "consolidated.*.pth")
MODEL_CONFIGS = ("config.json", "params.json")


def write_model(args, state: dict, out_dir, layout, tokenizer_path=None, shard_size="5GB"):
    """A whole model (a state dict in Meta's names, output.weight included) in the layout "hf", "meta" or
    "own", with the RoPE scaling and context of `args` in its config, into a new folder out_dir (lora.py merge
    and train.py --full build it beside their destination: longlora/output.py)."""
    if layout == "hf":
        write_hf(args, state, out_dir, tokenizer_path, shard_size)
    elif layout == "meta":
        write_meta(args, state, out_dir, tokenizer_path)
    else:
        write_own(args, state, out_dir, tokenizer_path)

