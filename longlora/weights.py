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
import math
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
        bad = next((k for k, v in weights.specs.items() if not v.is_floating_point()), None)
        if bad is not None:  # an integer tensor would be cast to the compute dtype as if it held the weights
            raise CheckpointError(f"{path}: tensor {bad} is {str(weights.specs[bad].dtype).removeprefix('torch.')}, not "
                                  "floating point (a quantized checkpoint?); this project reads fp32, fp16 or bf16 weights")
        return model_args(**config), weights
    except CheckpointError:
        raise
    except (KeyError, ValueError, TypeError) as e:  # a config lacking a field, or with values that make no model
        config = os.path.join(path, "config.json" if layout == "hf" else "params.json")
        raise CheckpointError(f"{config}: " + (f"no field {e}" if isinstance(e, KeyError) else one_line(e))) from None


def read_own(path):
    """This project's layout: params.json holds ModelArgs' own fields, checked by ModelArgs itself."""
    params = read_json(os.path.join(path, "params.json"))
    if not isinstance(params, dict):
        raise CheckpointError(f"{path}/params.json: expected a JSON object, got {json.dumps(params)[:40]}")
    return params, _read_safetensors([os.path.join(path, "model.safetensors")], lambda k: (k, None))


def read_meta(path):
    """Meta's layout. Model-parallel shards split each matrix across files; merge them back, one tensor at a time.

    Row-parallel layers were split on their input (dim 1): tok_embeddings, wo, w2. Every other matrix was
    split on its output (dim 0). 1-D tensors (the norms) are replicated: take shard 0's.
    """
    params_path = os.path.join(path, "params.json")
    if not os.path.exists(params_path):
        raise CheckpointError(f"{path}: consolidated.NN.pth shards but no params.json")
    params = read_json(params_path)
    if not isinstance(params, dict):
        raise CheckpointError(f"{params_path}: expected a JSON object, got {json.dumps(params)[:40]}")
    get = lambda name, kind, default=REQUIRED, **bounds: json_field(params, name, kind, params_path, default, **bounds)
    if get("use_scaled_rope", bool, False):  # Meta's Llama 3.1 and 3.2: the llama3 rule with constants of its code
        raise CheckpointError(f"{params_path}: use_scaled_rope (Llama 3.1's frequency rule) is not read from Meta's layout; "
                              "use the model's HF checkpoint, whose config.json states the rule")
    args = dict(
        dim=get("dim", int, lo=1), n_layers=get("n_layers", int, lo=1), n_heads=get("n_heads", int, lo=1),
        n_kv_heads=get("n_kv_heads", int, None, lo=1), vocab_size=get("vocab_size", int, -1, lo=-1),
        multiple_of=get("multiple_of", int, 256, lo=1), ffn_dim_multiplier=get("ffn_dim_multiplier", float, None, above=0),
        norm_eps=get("norm_eps", float, 1e-5, above=0), rope_theta=get("rope_theta", float, 10000.0, above=0),
        rope_scaling=get("rope_scaling", float, 1.0, lo=1), max_seq_len=get("max_seq_len", int, 4096, lo=1),
        original_max_seq_len=get("original_max_seq_len", int, None, lo=1),
    )
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
    if args["vocab_size"] <= 0:  # Meta's params.json says -1: the tokenizer decides; read it off the weights
        args["vocab_size"] = specs["tok_embeddings.weight"].shape[0] if "tok_embeddings.weight" in specs else 32000
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
        meta, heads = names[k], qk_heads(names[k], args)
        return meta, heads and (lambda w: hf_to_meta_qk(w, heads))

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
    "layers.{}.attention.wq.bias": "model.layers.{}.self_attn.q_proj.bias",  # Qwen2's biases (q, k and v only)
    "layers.{}.attention.wk.bias": "model.layers.{}.self_attn.k_proj.bias",
    "layers.{}.attention.wv.bias": "model.layers.{}.self_attn.v_proj.bias",
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
    adjacent pairs (2i, 2i+1); HF's converter reordered the rows of wq and wk so the two agree. w: a weight
    (out, in) or a bias (out,), whose entries are rows too."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, -1).transpose(1, 2).reshape(w.shape)


def meta_to_hf_qk(w, n_heads):
    """The inverse of hf_to_meta_qk: Meta's rows in HF's rotate-half order (used by exports)."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, -1).transpose(1, 2).reshape(w.shape)


def qk_heads(meta_name, args):
    """The head count whose rows hf_to_meta_qk permutes in this tensor (wq's or wk's weight or bias), else None."""
    if ".attention." in meta_name:  # layers.N.attention.wq.weight
        return {"wq": args["n_heads"], "wk": args["n_kv_heads"]}.get(meta_name.split(".")[-2])
    return None


# The model types this project runs, with the HF class that runs each. Every one is model.py's Transformer: LLaMA 2
# and 3 (llama), Mistral without a sliding window (mistral), Qwen2 and 2.5 (qwen2: biases on q, k and v).
FAMILIES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}


def hf_config_fields(cfg, where="config.json") -> dict:
    """ModelArgs fields from an HF config.json of a model type of FAMILIES. Anything that would make the model
    compute something else than model.py (another architecture, a bias on o_proj or in the MLP, a head_dim of its
    own, a sliding window shorter than the context, a RoPE type other than linear or llama3) is refused, naming it.

    The context under linear RoPE scaling. transformers reads none off these fields for linear scaling (the
    factor only divides the positions), so two conventions are in use, told apart by one field:
      * absent `original_max_position_embeddings` (HF's convention, this project's exports, LongLoRA's released
        models): `max_position_embeddings` is the pre-training context and the context is max_position_embeddings x
        factor (what vLLM and SGLang derive). LongLoRA's fine-tune.py keeps `max_position_embeddings` and adds the
        factor (its -ft 32k models say 4096 + linear 8), and reads a config back the same way (fine-tune.py
        @d4eb344, lines 121-131: orig_ctx_len = max_position_embeddings x factor);
      * present (this project's earlier exports): it is the pre-training context, and `max_position_embeddings`
        the extended one.
    A LLaMA2 that raised max_position_embeddings to its extended context itself (togethercomputer/LLaMA-2-7B-32K:
    32768 + linear 8) reads as 262,144 tokens by the first rule: above LLaMA2's 4096 it is ambiguous, and loading
    says so in a warning that names the field to add.

    Llama 3.1's rope type "llama3" reshapes the frequencies (model.rope_frequencies), not the positions: its context
    is max_position_embeddings (131072), and its original_max_position_embeddings (8192) belongs to the rule.
    """
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{where}: expected a JSON object, got {json.dumps(cfg)[:40]}")
    get = lambda name, kind, default=REQUIRED, **bounds: json_field(cfg, name, kind, where, default, **bounds)
    for arch in get("architectures", list, []):
        if arch not in FAMILIES.values():
            raise CheckpointError(f"{where}: architecture {arch!r} is not supported (this project runs "
                                  f"{', '.join(FAMILIES.values())})")
    family = get("model_type", str, "llama")
    if family not in FAMILIES:
        raise CheckpointError(f"{where}: model_type {family!r} is not supported (this project runs {', '.join(FAMILIES)})")
    if get("hidden_act", str, "silu") != "silu":
        raise CheckpointError(f"{where}: hidden_act {cfg['hidden_act']!r} is not supported (only SwiGLU's silu)")
    for name, what in (("attention_bias", "a bias on o_proj as well as on q, k and v"), ("mlp_bias", "biases in the MLP")):
        if get(name, bool, False):
            raise CheckpointError(f"{where}: {name} true ({what}) is not supported")
    dim, n_heads = get("hidden_size", int, lo=1), get("num_attention_heads", int, lo=1)
    if get("head_dim", int, None, lo=1) not in (None, dim // n_heads):
        raise CheckpointError(f"{where}: head_dim {cfg['head_dim']} != hidden_size / num_attention_heads is not supported")
    # transformers 4.x writes rope_theta + rope_scaling; 5.x writes rope_parameters holding both (and reads either).
    # One fact, two places: where both are given, they must agree.
    theta = get("rope_theta", float, None, above=0)
    max_pos = get("max_position_embeddings", int, 4096, lo=1)
    top_original = get("original_max_position_embeddings", int, None, lo=1)
    ropes = {}
    for name in ("rope_scaling", "rope_parameters"):
        rope = get(name, dict, None)
        if rope is None:
            continue
        rget = lambda key, kind, default=REQUIRED, **bounds: json_field(rope, key, kind, f"{where}: {name}", default, **bounds)
        kind = rget("rope_type", str, None) or rget("type", str, "default")
        if kind not in ("default", "linear", "llama3") or any(isinstance(v, dict) for v in rope.values()):
            raise CheckpointError(f"{where}: {name} of rope type {kind!r} is not supported (only linear and llama3)")
        if rget("partial_rotary_factor", float, 1.0) != 1.0 or get("partial_rotary_factor", float, 1.0) != 1.0:
            raise CheckpointError(f"{where}: partial_rotary_factor (RoPE on part of each head) is not supported")
        r = dict(kind=kind, factor=rget("factor", float, lo=1) if kind in ("linear", "llama3") else 1.0,
                 theta=rget("rope_theta", float, None, above=0), original=rget("original_max_position_embeddings", int, None, lo=1))
        if kind == "llama3":
            r.update(low=rget("low_freq_factor", float, above=0), high=rget("high_freq_factor", float, above=0))
        ropes[name] = r
    said = {n: " ".join([r["kind"]] + [f"{k} {v:g}" for k, v in r.items() if k not in ("kind", "theta") and v is not None
                                       and (k, r["kind"]) != ("factor", "default")]) for n, r in ropes.items()}
    if len(set(said.values())) > 1:  # e.g. "linear factor 8" and "linear factor 4"
        raise CheckpointError(f"{where}: " + " and ".join(f"{n}'s {d}" for n, d in said.items()) + " disagree; keep one of them")
    thetas = [(f"{n}'s rope_theta", r["theta"]) for n, r in ropes.items() if r["theta"] is not None]
    thetas += [("rope_theta", theta)] if theta is not None else []
    if len({t for _, t in thetas}) > 1:
        raise CheckpointError(f"{where}: " + " and ".join(f"{n} {t:g}" for n, t in thetas) + " disagree; keep one of them")
    rope = next(iter(ropes.values()), dict(kind="default", factor=1.0, theta=None, original=None))
    theta = theta or rope["theta"] or 10000.0
    args = dict(rope_theta=theta, rope_scaling=1.0, max_seq_len=max_pos, original_max_seq_len=top_original or max_pos)
    if rope["kind"] == "llama3":  # transformers takes a top-level original_max_position_embeddings first
        if top_original and rope["original"] and top_original != rope["original"]:
            raise CheckpointError(f"{where}: original_max_position_embeddings {top_original} and rope_scaling's "
                                  f"{rope['original']} disagree; keep one of them")
        args.update(llama3_factor=rope["factor"], llama3_low_freq_factor=rope["low"], llama3_high_freq_factor=rope["high"],
                    llama3_context=top_original or rope["original"] or max_pos, original_max_seq_len=max_pos)
    elif rope["kind"] == "linear":
        factor, original = rope["factor"], top_original or rope["original"]
        if factor > 1 and not original and max_pos > 4096 and theta == 10000.0 and os.environ.get("LOCAL_RANK", "0") == "0":
            print(f"warning: {where}: the context is read as max_position_embeddings {max_pos} x linear factor {factor:g} = "
                  f"{round(max_pos * factor)} tokens (HF's convention for a config without original_max_position_"
                  f"embeddings); if {max_pos} is already the extended context, add "
                  f'"original_max_position_embeddings": <the pre-training context> to it', file=sys.stderr)
        args.update(rope_scaling=factor, max_seq_len=max_pos if original else round(max_pos * factor),
                    original_max_seq_len=original or max_pos)
    # A sliding window shorter than the context hides keys that model.py attends to. (Qwen2 uses its window only
    # with use_sliding_window; Mistral whenever it is set.)
    window = get("sliding_window", int, None, lo=1) if family == "mistral" or get("use_sliding_window", bool, False) else None
    if window is not None and window < args["max_seq_len"]:
        raise CheckpointError(f"{where}: sliding_window {window} is shorter than the context {args['max_seq_len']}: "
                              "attention within a sliding window is not supported (only attention to the whole context)")
    return dict(
        dim=dim, n_layers=get("num_hidden_layers", int, lo=1), n_heads=n_heads,
        n_kv_heads=get("num_key_value_heads", int, n_heads, lo=1), vocab_size=get("vocab_size", int, lo=1),
        ffn_hidden_dim=get("intermediate_size", int, lo=1), norm_eps=get("rms_norm_eps", float, 1e-6, above=0),
        tie_embeddings=get("tie_word_embeddings", bool, False), qkv_bias=family == "qwen2", **args,
    )


REQUIRED = object()  # json_field's default for a field that must be there


def json_field(cfg, name, kind, where, default=REQUIRED, lo=None, above=None, below=None):
    """cfg[name] of a user's JSON file, checked: kind int (not a boolean), float (any finite number), bool, str,
    list or dict; a number >= lo, or > above, and < below. Absent or null: `default`, or an error if it is REQUIRED.
    Every field of config.json, Meta's params.json and the adapter configs (ours, PEFT's) is read through here:
    a wrong one is one line naming the file and the field."""
    v = cfg.get(name)
    if v is None:
        if default is REQUIRED:
            raise CheckpointError(f"{where}: no field {name!r}")
        return default
    number = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    ok = {int: number and isinstance(v, int), float: number, bool: isinstance(v, bool), str: isinstance(v, str),
          list: isinstance(v, list), dict: isinstance(v, dict)}[kind]
    ok = ok and (lo is None or v >= lo) and (above is None or v > above) and (below is None or v < below)
    if not ok:
        want = {int: "an integer", float: "a finite number", bool: "true or false", str: "a string", list: "a list",
                dict: "an object"}[kind]
        want += f" >= {lo}" if lo is not None else f" > {above}" if above is not None else ""
        want += f"{' and' if lo is not None or above is not None else ''} < {below}" if below is not None else ""
        raise CheckpointError(f"{where}: field {name!r} must be {want}, got {json.dumps(v)[:40]}")
    return float(v) if kind is float else v


def load_into(model, weights, where, dtype=None, device=None):
    """Fill a model built on the meta device from `weights` (read_checkpoint's), strictly, one block at a time
    (read from the memory-mapped files, converted to dtype/device as they arrive). device: one for every tensor, or a
    function of a tensor's name (a model split over devices: longlora/devices.py)."""
    device_of = device if callable(device) else lambda name: device
    tied = model.args.tie_embeddings
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if not (tied and k == "output.weight")}
    check_state_dict(weights.specs, expected, where)
    state = {}
    for _, names in itertools.groupby(weights.specs, key=lambda k: k.split(".")[:2]):  # ["layers", "0"], ...
        state.update({k: v.to(device=device_of(k), dtype=dtype if v.is_floating_point() and dtype else v.dtype)
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


def check_exportable(args, layout):
    """Refuse, in one line, a model that the layout ("hf", "meta" or "own") cannot state exactly. Called before the
    long work (lora.py merge, train.py --full) and again by the writers."""
    if layout == "hf" and args.llama3_factor != 1.0 and args.rope_scaling != 1.0:
        raise ValueError(f"linear position interpolation (factor {args.rope_scaling:g}) on top of Llama 3.1's rope type "
                         "llama3 has no config.json form (transformers applies one rope type, and llama3 with a larger "
                         "factor keeps the fast frequencies, which the interpolation slows): use --format own")
    if layout == "meta" and (args.qkv_bias or args.llama3_factor != 1.0):
        raise ValueError("Meta's params.json has no q/k/v biases and no llama3 rope type: use --format hf or own")
    if layout == "meta":
        meta_params(args)  # a SwiGLU width it cannot state


def hf_config(args, dtype: torch.dtype, tokenizer=None) -> dict:
    """The config.json of these args, written by hand (the product never imports transformers): a LlamaConfig, or a
    Qwen2Config for a model with q/k/v biases (a Mistral without a sliding window is a LLaMA).

    The RoPE scaling is written once, as `rope_scaling` + `rope_theta`, which both generations of transformers
    read: 4.x as they are, 5.x by converting them to its `rope_parameters` (which it would write itself). Not
    both: a config that says one fact twice can be edited into two answers (hf_config_fields refuses a config
    whose `rope_scaling` and `rope_parameters` disagree). Linear scaling follows HF's convention:
    `max_position_embeddings` is the pre-training context and max_position_embeddings x factor the context the
    interpolation reaches, what vLLM and SGLang derive (the trained context rounded up to a multiple of the
    pre-training one, as the factor is ceil(ctx / pre-training context)). Llama 3.1's llama3 rule is written as
    it was read, with max_position_embeddings its context.
    """
    check_exportable(args, "hf")
    qwen2 = args.qkv_bias
    rope, max_pos = None, max(args.max_seq_len, args.original_max_seq_len)  # an adapter trained on less says less
    if args.llama3_factor != 1.0:
        rope = {"rope_type": "llama3", "factor": args.llama3_factor, "low_freq_factor": args.llama3_low_freq_factor,
                "high_freq_factor": args.llama3_high_freq_factor, "original_max_position_embeddings": args.llama3_context}
    elif args.rope_scaling != 1.0:
        rope, max_pos = {"type": "linear", "factor": args.rope_scaling}, args.original_max_seq_len
    cfg = {
        "architectures": ["Qwen2ForCausalLM" if qwen2 else "LlamaForCausalLM"],
        "model_type": "qwen2" if qwen2 else "llama",
        "hidden_size": args.dim,
        "intermediate_size": args.hidden_dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads,
        "head_dim": args.head_dim,
        "vocab_size": args.vocab_size,
        "hidden_act": "silu",
        "rms_norm_eps": args.norm_eps,
        "max_position_embeddings": max_pos,
        "rope_theta": args.rope_theta,
        "rope_scaling": rope,
        "tie_word_embeddings": args.tie_embeddings,
        "bos_token_id": (tokenizer.bos_id if tokenizer.bos_id >= 0 else None) if tokenizer else 1,
        "eos_token_id": tokenizer.eos_id if tokenizer else 2,
        "use_cache": True,
        "torch_dtype": str(dtype).removeprefix("torch."),  # 4.x's name, which 5.x reads too (and writes as `dtype`)
    }
    if qwen2:  # q, k and v biases are Qwen2's own; its window is off
        cfg.update(use_sliding_window=False, sliding_window=None)
    else:
        cfg.update(attention_bias=False, mlp_bias=False, pretraining_tp=1)
    return cfg


def meta_to_hf_state(args, state: dict) -> dict:
    """Meta names -> HF names, with wq/wk rows permuted to HF's rotate-half order (see meta_to_hf_qk)."""
    names = {meta: hf for hf, meta in hf_key_map(args.n_layers).items()}
    out = {}
    for k, v in state.items():
        if k == "output.weight" and args.tie_embeddings:
            continue  # HF re-ties lm_head to embed_tokens
        if k not in names:
            raise ValueError(f"cannot export tensor {k}: no HF name for it")
        heads = qk_heads(k, asdict(args))
        out[names[k]] = meta_to_hf_qk(v, heads) if heads else v
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
        x = float(s) * m
    except ValueError:
        raise ValueError(f"{text}: not a size (expected e.g. 5GB, 500MB or a number of bytes)") from None
    if not (math.isfinite(x) and x >= 1):
        raise ValueError(f"{text}: must be a finite size of at least 1 byte")
    return int(x)


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
    check_exportable(args, layout)
    if layout == "hf":
        write_hf(args, state, out_dir, tokenizer_path, shard_size)
    elif layout == "meta":
        write_meta(args, state, out_dir, tokenizer_path)
    else:
        write_own(args, state, out_dir, tokenizer_path)

