"""
Adapter files: what train.py writes and sample.py, eval and the exports read.

    out/adapter.safetensors     the trained tensors: every lora_a / lora_b, and tok_embeddings and the norms
                                if they trained (lora.adapter_state)
    out/adapter_config.json     how to rebuild the model: r, alpha, dropout, targets, what else trained, the base's
                                shapes and a fingerprint of its weights, the RoPE scaling and the context

    save_adapter(model, "out/adapter", ctx=32768)
    load_adapter(Transformer.from_pretrained("llama-2-7b"), "out/adapter")   # the fine-tuned model again
    model = load_model("llama-2-7b", "out/adapter")                          # the same, ready for inference

An adapter loads only on the base it was trained on: the shapes must agree, and so must the fingerprint of the
frozen weights (a few thousand values of the first and last layers, hashed).
"""

import hashlib
import json
import os

import torch
import torch.nn as nn

from longlora.checkpoint import find_checkpoint, read_checkpoint_file, read_state
from longlora.cli import UsageError
from longlora.devices import pipeline
from longlora.output import atomic_write, write_text
from longlora.weights import json_field, read_checkpoint
from lora import TARGETS, adapter_state, apply_lora, in_adapter, mark_trainable
from model import ModelArgs, Transformer

ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
# The fields of adapter_config.json that rebuild the model, with their types and ranges (weights.json_field's).
ADAPTER_FIELDS = {"r": (int, dict(lo=1)), "alpha": (float, dict(above=0)), "dropout": (float, dict(lo=0, below=1)),
                  "targets": (list, {}), "embed": (bool, {}), "norms": (bool, {}), "base": (dict, {}),
                  "rope_scaling": (float, dict(lo=1)), "max_seq_len": (int, dict(lo=1))}
# The ModelArgs fields that decide the tensor shapes (and rope_theta, which decides what the weights mean):
# an adapter only fits a base model that agrees on all of them.
BASE_FIELDS = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "hidden_dim", "tie_embeddings", "qkv_bias", "rope_theta",
               "llama3_factor", "llama3_low_freq_factor", "llama3_high_freq_factor", "llama3_context")


def base_shapes(args: ModelArgs) -> dict:
    return {f: getattr(args, f) for f in BASE_FIELDS}


def base_fingerprint(tensor, n_layers) -> str:
    """A fingerprint of the frozen base weights: 4096 evenly spaced values of wq and w2 of the first and last
    layers, rounded to bf16 (so that an fp32 or a bf16 copy of one base gives the same), hashed. Another base of the
    same shapes, or a model an adapter was already merged into (wq changed), has another fingerprint.
    tensor(name) gives a whole tensor: the checkpoint's reader (train.py, load_model), so the load dtype plays no
    part (an fp32 value rounded to fp16 and then to bf16 can differ from the same value rounded to bf16 at once),
    or a model's state_dict().__getitem__ for a model that is not loaded from a file."""
    h = hashlib.sha256()
    for i in (0, n_layers - 1):
        for name in (f"layers.{i}.attention.wq.weight", f"layers.{i}.feed_forward.w2.weight"):
            t = tensor(name).detach().flatten()
            t = t[:: max(1, t.numel() // 4096)][:4096].to("cpu", torch.float32)
            t = torch.where(t.abs() < 2**-14, 0.0, t)  # below fp16's normal range an fp16 copy of a bf16 base differs
            h.update(t.to(torch.bfloat16).view(torch.int16).numpy().tobytes())
    return h.hexdigest()[:16]


def check_storable(model):
    """A parameter that trains but that an adapter does not store would be silently lost: refuse it. (A tied output
    head is tok_embeddings' own parameter, stored once under that name.)"""
    saved = set(adapter_state(model))
    lost = [n for n, p in model.named_parameters() if p.requires_grad and n not in saved]
    if lost:
        raise ValueError(f"parameter {lost[0]} is trainable but an adapter does not store it; "
                         "use mark_trainable(model, embed=..., norms=...) to say what trains")


def save_adapter(model: Transformer, out_dir, *, ctx: int, extra: dict | None = None, fingerprint: str | None = None):
    """Write `adapter.safetensors` and `adapter_config.json` into out_dir (atomically, file by file).

    ctx: the context length the model was fine-tuned for (becomes max_seq_len when loaded).
    extra: free-form JSON-able notes (train.py puts its arguments here).
    fingerprint: base_fingerprint of the base model (default: computed from `model`'s frozen weights).
    """
    from safetensors.torch import save_file

    model = getattr(model, "_orig_mod", model)  # a torch.compile'd model: save the real one's names
    cfg = getattr(model, "lora_config", None)
    if cfg is None:
        raise ValueError("the model has no LoRA layers; nothing to save as an adapter")
    check_storable(model)
    state = adapter_state(model)
    config = dict(
        format="longlora-adapter", r=cfg["r"], alpha=cfg["alpha"], dropout=cfg["dropout"], targets=cfg["targets"],
        embed=cfg["embed"], norms=cfg["norms"], base=base_shapes(model.args),
        rope_scaling=model.args.rope_scaling, max_seq_len=int(ctx), extra=extra or {},
        base_fingerprint=fingerprint or base_fingerprint(model.state_dict().__getitem__, model.args.n_layers),
    )
    os.makedirs(out_dir, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    atomic_write(os.path.join(out_dir, ADAPTER_WEIGHTS), lambda f: save_file(tensors, f, metadata={"format": "pt"}))
    text = json.dumps(config, indent=2)
    write_text(os.path.join(out_dir, ADAPTER_CONFIG), text + "\n")


def read_adapter(adapter_dir):
    """(config dict, {name: tensor}) from an adapter directory; ValueError/FileNotFoundError on bad input."""
    from safetensors.torch import load_file

    cfg_path, w_path = os.path.join(adapter_dir, ADAPTER_CONFIG), os.path.join(adapter_dir, ADAPTER_WEIGHTS)
    if not os.path.exists(cfg_path) and any(os.path.exists(os.path.join(adapter_dir, f)) for f in ("state.json", "checkpoints")):
        return checkpoint_as_adapter(adapter_dir)
    for p in (cfg_path, w_path):
        if not os.path.isfile(p):
            raise FileNotFoundError(f"{adapter_dir}: no {os.path.basename(p)} (not an adapter directory)")
    try:
        with open(cfg_path) as f:
            cfg = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{cfg_path}: cannot read JSON ({e})") from None
    if cfg.get("format") != "longlora-adapter":
        hint = (" (a PEFT adapter: convert it with `python lora.py import --peft DIR --base BASE --out ADAPTER`)"
                if "peft_type" in cfg else "")
        raise ValueError(f"{cfg_path}: not an adapter written by train.py or lora.py import{hint}")
    try:
        tensors = load_file(w_path)
    except Exception as e:
        raise ValueError(f"{w_path}: cannot read safetensors file ({str(e).splitlines()[0]})") from None
    return check_adapter(cfg, cfg_path, tensors, w_path)


def check_adapter(cfg, where, tensors, tensors_where):
    """An adapter's config, every field of ADAPTER_FIELDS of its type and in range, and its tensors floating
    point and finite: ValueError naming the file and the field or tensor. Returns (cfg, tensors)."""
    for name, (kind, bounds) in ADAPTER_FIELDS.items():
        json_field(cfg, name, kind, where, **bounds)
    if not (cfg["targets"] and all(t in TARGETS for t in cfg["targets"])):
        raise ValueError(f"{where}: field 'targets' must be a non-empty list of {', '.join(TARGETS)}, got {cfg['targets']}")
    for k, v in tensors.items():
        if not v.is_floating_point() or not torch.isfinite(v).all():
            raise ValueError(f"{tensors_where}: tensor {k} " + (f"is {str(v.dtype).removeprefix('torch.')}, not floating point"
                                                                if not v.is_floating_point() else "holds NaN or infinite values"))
    return cfg, tensors


def checkpoint_as_adapter(path):
    """(config dict, {name: tensor}) as read_adapter gives them, from a LoRA run's checkpoint (train.py): `path`
    is the checkpoint or its run folder (then its newest complete checkpoint). So a run that has not finished
    (or was stopped) can be sampled, evaluated and merged from its last checkpoint."""
    ckpt = find_checkpoint(path)
    state = read_state(ckpt)
    c = state["config"]
    if c.get("from_scratch") or c.get("full"):
        raise ValueError(f"{ckpt}: a checkpoint of full-parameter training (every weight trains), not of a LoRA adapter: "
                         "its model is the run's result, written when the run (or its --resume) finishes")
    tensors = read_checkpoint_file(ckpt, "trainable.safetensors")
    cfg = dict(format="longlora-adapter", r=c.get("lora_r"), alpha=c.get("lora_alpha"), dropout=c.get("lora_dropout"),
               targets=c.get("lora_targets"), embed=not c.get("no_train_embed"), norms=not c.get("no_train_norms"), base={},
               rope_scaling=state.get("rope_scaling"), max_seq_len=c.get("ctx"),  # as train.py's save_adapter(ctx=--ctx)
               base_fingerprint=state.get("base_fingerprint"), extra={"checkpoint": os.path.abspath(ckpt)})
    return check_adapter(cfg, os.path.join(ckpt, "state.json"), tensors, os.path.join(ckpt, "trainable.safetensors"))


def load_adapter(model: Transformer, adapter_dir, fingerprint=None) -> Transformer:
    """Turn a base model into the fine-tuned one, in place: apply LoRA as recorded, set rope_scaling and
    max_seq_len, load the adapter's tensors strictly, and mark the same parameters trainable (so training
    can resume). Refuses, with a one-line ValueError, an adapter that does not fit this base model.
    fingerprint: base_fingerprint of the model's checkpoint as stored (default: of the model's weights).
    """
    cfg, tensors = read_adapter(adapter_dir)
    where = os.path.join(adapter_dir, ADAPTER_CONFIG)
    ours = base_shapes(model.args)
    for field, value in cfg["base"].items():
        if field not in ours:
            raise ValueError(f"{where}: unknown base field {field!r}")
        if ours[field] != value:
            raise ValueError(f"adapter {adapter_dir} was trained on a base model with {field}={value}, "
                             f"this one has {field}={ours[field]}")
    theirs = cfg.get("base_fingerprint")  # (adapters written before fingerprints have none)
    if theirs and theirs != (fingerprint or base_fingerprint(model.state_dict().__getitem__, model.args.n_layers)):
        raise ValueError(f"adapter {adapter_dir} was trained on another base model than this one (their weights differ), "
                         "or this model already contains it (a merged export): load it on the base it was trained on")
    have = getattr(model, "lora_config", None)
    if have is not None:  # the model already has LoRA layers: they must be the same ones
        for field in ("r", "alpha", "targets"):
            if have[field] != cfg[field]:
                raise ValueError(f"adapter {adapter_dir} has {field}={cfg[field]}, the model's LoRA has {have[field]}")
    # Check every tensor before touching the model, so a refused adapter leaves it as it was.
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if in_adapter(k, cfg["embed"], cfg["norms"])}
    if have is None:  # the LoRA matrices apply_lora will create: A (r, in), B (out, r)
        for name, m in model.named_modules():
            if name.rsplit(".", 1)[-1] in cfg["targets"] and isinstance(m, nn.Linear):
                out_features, in_features = m.weight.shape
                expected.update({f"{name}.lora_a": (cfg["r"], in_features), f"{name}.lora_b": (out_features, cfg["r"])})
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        what, names = ("missing tensor", missing) if missing else ("unexpected tensor", unexpected)
        raise ValueError(f"adapter {adapter_dir}: {what} {names[0]}" + (f" (and {len(names) - 1} more)" if len(names) > 1 else ""))
    for k, v in tensors.items():
        if tuple(v.shape) != expected[k]:
            raise ValueError(f"adapter {adapter_dir}: tensor {k} has shape {tuple(v.shape)}, the model expects {expected[k]}")

    if have is None:
        apply_lora(model, r=cfg["r"], alpha=cfg["alpha"], dropout=cfg["dropout"], targets=cfg["targets"])
    mark_trainable(model, embed=cfg["embed"], norms=cfg["norms"])
    with torch.no_grad():
        for k, p in adapter_state(model).items():
            p.copy_(tensors[k])  # into the existing parameter: keeps its device and dtype (fp32 LoRA is exact)
    model.args.rope_scaling = float(cfg["rope_scaling"])
    model.args.max_seq_len = int(cfg["max_seq_len"])
    return model


def load_model(model_dir, adapter_dir=None, dtype=None, device=None, rope_scaling=None) -> Transformer:
    """A base model, a merged export, or a base plus a LoRA adapter (load_adapter applies the adapter's RoPE scaling
    and context), in eval mode, on `device`, or split over a list of devices (longlora/devices.py). Raises
    CheckpointError / ValueError / FileNotFoundError with one line.

    rope_scaling: a linear factor for a model whose config states none (LongAlpaca's fully fine-tuned models ship
    `rope_scaling: null`): the context becomes the pre-training context x the factor. Refused where the model
    (or the adapter) states another factor."""
    if adapter_dir is not None and not os.path.isdir(adapter_dir):
        raise FileNotFoundError(f"{adapter_dir}: no such adapter directory")
    checkpoint = read_checkpoint(model_dir, ModelArgs)
    if isinstance(device, list):  # each tensor straight onto its stage's device
        device = pipeline(checkpoint, device)
    model = Transformer.from_pretrained(model_dir, dtype=dtype, device=device, checkpoint=checkpoint)
    if adapter_dir is not None:  # the base's fingerprint from its stored tensors, whatever dtype it was loaded in
        weights = checkpoint[1]
        fingerprint = base_fingerprint(lambda name: weights.read([name])[name], model.args.n_layers)
        load_adapter(model, adapter_dir, fingerprint)  # LoRA matrices stay fp32 next to bf16 weights, by design
    args = model.args
    if rope_scaling is not None and args.rope_scaling not in (1.0, rope_scaling):
        raise UsageError(f"--rope-scaling {rope_scaling:g}: {adapter_dir or model_dir} states linear factor "
                         f"{args.rope_scaling:g} already; leave --rope-scaling out")
    if rope_scaling is not None and args.rope_scaling == 1.0:
        args.rope_scaling, args.max_seq_len = float(rope_scaling), round(args.original_max_seq_len * rope_scaling)
    return model.eval()


DEMO_RESULTS = os.path.join("out", "demo", "results.json")


def demo_model():
    """(base, adapter) of the best fine-tuned model of `python demo.py`, as its results.json names them: the model
    sample.py uses when no --model is given (as nanoGPT's sample.py reads out/)."""
    try:
        with open(DEMO_RESULTS) as f:
            best = json.load(f)["sample"]
        root = os.path.dirname(DEMO_RESULTS)
        # the adapter is null when the best model was fully fine-tuned (a whole model of its own)
        return os.path.join(root, best["base"]), best["adapter"] and os.path.join(root, best["adapter"])
    except (OSError, ValueError, KeyError, TypeError):
        raise UsageError(f"no --model given and no demo model in {DEMO_RESULTS}: pass --model DIR (a checkpoint), "
                         "or run `python demo.py` first") from None
