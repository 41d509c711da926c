"""
Adapters in and out of other formats: the merged model (HF, Meta or this project's layout), the adapter in
PEFT's layout, and LongLoRA's released LoRA weights (a PEFT adapter + trainable_params.bin) read back in.

    python lora.py merge  --base llama-2-7b --adapter out/adapter --out llama-2-7b-32k            # HF layout
    python lora.py merge  --base llama-2-7b --adapter out/adapter --out llama-2-7b-32k --format meta
    python lora.py peft   --base llama-2-7b --adapter out/adapter --out llama-2-7b-32k-peft
    python lora.py import --peft Llama-2-7b-longlora-32k --base llama-2-7b-hf --ctx 32768 --out longlora-32k

(`python -m longlora.export ...` runs the same.) An imported adapter is this project's own
(adapter.safetensors + adapter_config.json): sample.py --adapter, longlora/eval.py and `merge` take it.
"""

import os
import sys

import torch

from longlora.adapter import load_model, save_adapter
from longlora.cli import MAX_CTX, Parser, UsageError, entry, integer
from longlora.output import atomic_write, building, check_output
from longlora.weights import (CheckpointError, check_exportable, check_state_dict, hf_config, hf_config_fields, hf_key_map,
                              hf_to_meta_qk, json_field, meta_to_hf_qk, parse_size, read_json, write_json, write_model)
from lora import TARGETS, adapter_state, apply_lora, mark_trainable, merge_lora
from model import ModelArgs, Transformer


# ----------------------------------------------------------------------------------------------------
# Export: the adapter in PEFT's layout (a merged model is weights.write_model)

# Our LoRA targets -> HF's module names, as PEFT's target_modules (weights.HF_KEYS has the full tensor names).
PEFT_TARGETS = {"wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "o_proj",
                "w1": "gate_proj", "w2": "down_proj", "w3": "up_proj", "output": "lm_head"}


def peft_adapter(model: Transformer) -> tuple:
    """(adapter_config dict, {HF/PEFT name: tensor}) in PEFT's LoRA layout for a model with loaded LoRA.

    Names: `base_model.model.` + the HF tensor name, with `.weight` of a LoRA layer replaced by
    `.lora_A.weight` / `.lora_B.weight`; modules to save (embedding, norms) under their plain HF names.

    q and k: HF stores the rows of wq and wk permuted (P) for its rotate-half RoPE, so the HF layer computes
    P·W·x. The update must become P·ΔW = (α/r)·(P·B)·A: permute the rows of B. A acts on the input x,
    whose order is the same in both layouts, so A is unchanged.
    """
    cfg, args = model.lora_config, model.args
    if args.tie_embeddings and cfg["embed"]:
        raise ValueError("PEFT export of a trained embedding that is tied to the output head is not supported")
    names = {meta: hf for hf, meta in hf_key_map(args.n_layers).items()}
    tensors = {}
    for k, v in adapter_state(model).items():
        v = v.detach().cpu()
        if k.endswith((".lora_a", ".lora_b")):
            hf = names[k[: -len("lora_a")] + "weight"].removesuffix(".weight")  # e.g. model.layers.0.self_attn.q_proj
            if k.endswith(("attention.wq.lora_b", "attention.wk.lora_b")):
                v = meta_to_hf_qk(v, args.n_heads if ".wq." in k else args.n_kv_heads)
            k_hf = f"{hf}.lora_{'A' if k.endswith('lora_a') else 'B'}.weight"
        else:
            k_hf = names[k]
        tensors["base_model.model." + k_hf] = v.contiguous()
    modules_to_save = (["embed_tokens"] if cfg["embed"] else []) + (
        ["input_layernorm", "post_attention_layernorm", "norm"] if cfg["norms"] else [])
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": cfg["r"],
        "lora_alpha": cfg["alpha"],
        "lora_dropout": cfg["dropout"],
        "target_modules": [PEFT_TARGETS[t] for t in cfg["targets"]],
        "modules_to_save": modules_to_save or None,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,  # scale is alpha / r, as here
        "init_lora_weights": True,
        "inference_mode": True,
        # No base path: the base must be loaded with this directory's config.json (the rope scaling!).
        "base_model_name_or_path": None,
    }
    return config, tensors


def write_peft(model: Transformer, out_dir):
    """adapter_model.safetensors + adapter_config.json (PEFT) + config.json: the base model's HF config with the
    linear RoPE scaling and the new context, which PEFT's adapter format has no place for."""
    from safetensors.torch import save_file

    config, tensors = peft_adapter(model)
    os.makedirs(out_dir, exist_ok=True)
    atomic_write(os.path.join(out_dir, "adapter_model.safetensors"), lambda f: save_file(tensors, f, metadata={"format": "pt"}))
    write_json(os.path.join(out_dir, "adapter_config.json"), config)
    write_json(os.path.join(out_dir, "config.json"), hf_config(model.args, model.tok_embeddings.weight.dtype, model.tokenizer))


# ----------------------------------------------------------------------------------------------------
# Import: LongLoRA's released LoRA weights (or any PEFT LoRA adapter of a LLaMA) as this project's adapter
#
# A LongLoRA LoRA+ checkpoint holds (fine-tune.py, get_trainable_weights.py):
#   adapter_model.bin or .safetensors + adapter_config.json: PEFT's LoRA, r=8 alpha=16 on q_proj k_proj v_proj o_proj;
#   trainable_params.bin: torch.save of {HF name: tensor} for every name holding "embed" or "norm", with the
#     "base_model.model." prefix cut (model.embed_tokens.weight, model.layers.N.input_layernorm.weight, ...).
# Its merge script loads trainable_params.bin into the base (strict=False), then the PEFT adapter on top.
# Neither file records the context or the RoPE factor (fine-tune.py sets factor ceil(ctx / 4096) at load time);
# LongLoRA's released LoRA repositories also ship a config.json, most with the factor (dvlab-research/LongLoRA#181 on GitHub), which
# import_peft reads when --ctx is not given.

PEFT_PREFIX = "base_model.model."
# PEFT settings an adapter.safetensors cannot express (value PEFT writes when the feature is off).
PEFT_OFF = {"use_rslora": False, "use_dora": False, "fan_in_fan_out": False, "bias": "none", "layers_to_transform": None,
            "rank_pattern": {}, "alpha_pattern": {}, "lora_bias": False, "layer_replication": None}


def _load_tensors(path) -> dict:
    """{name: tensor} from a .safetensors file, or a torch.save'd .bin read with weights_only=True: a pickle
    that would run code or build other objects is refused, not executed."""
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read it as plain tensors ({type(e).__name__}: {str(e).strip().splitlines()[0]})") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        raise CheckpointError(f"{path}: expected a dict of named tensors")
    for k, v in state.items():  # trained values: floating point and finite, or the model's logits would not be
        if not v.is_floating_point():
            raise CheckpointError(f"{path}: tensor {k} is {str(v.dtype).removeprefix('torch.')}, not floating point")
        if not torch.isfinite(v).all():
            raise CheckpointError(f"{path}: tensor {k} holds NaN or infinite values")
    return state


def read_peft_dir(peft_dir) -> tuple:
    """(adapter_config dict, {HF name: tensor}) from a PEFT LoRA directory plus its trainable_params.bin, if any.

    Names lose PEFT's "base_model.model." prefix and adapter name: model.layers.0.self_attn.q_proj.lora_A.weight.
    """
    if not os.path.isdir(peft_dir):
        raise FileNotFoundError(f"{peft_dir}: no such directory")
    cfg_path = os.path.join(peft_dir, "adapter_config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{peft_dir}: no adapter_config.json (not a PEFT adapter directory)")
    cfg = read_json(cfg_path)
    if not isinstance(cfg, dict) or cfg.get("peft_type") != "LORA":
        raise CheckpointError(f"{cfg_path}: not a PEFT LoRA adapter (no \"peft_type\": \"LORA\")")
    json_field(cfg, "r", int, cfg_path, lo=1)
    json_field(cfg, "lora_alpha", float, cfg_path, above=0)
    cfg["lora_dropout"] = json_field(cfg, "lora_dropout", float, cfg_path, 0.0, lo=0, below=1)
    for field, off in PEFT_OFF.items():
        if cfg.get(field, off) not in (off, None):
            raise CheckpointError(f"{cfg_path}: {field}={cfg[field]!r} is not supported (only plain LoRA, scale alpha/r)")
    weights = [os.path.join(peft_dir, f) for f in ("adapter_model.safetensors", "adapter_model.bin")]
    weights = [f for f in weights if os.path.isfile(f)]
    if not weights:
        raise FileNotFoundError(f"{peft_dir}: no adapter_model.safetensors or adapter_model.bin")
    tensors = {}
    for path in weights[:1] + [f for f in [os.path.join(peft_dir, "trainable_params.bin")] if os.path.isfile(f)]:
        for k, v in _load_tensors(path).items():
            if ".lora_" in k and not k.endswith(("lora_A.weight", "lora_B.weight", "lora_A.default.weight", "lora_B.default.weight")):
                raise CheckpointError(f"{path}: tensor {k} is not supported ({'a LoRA bias' if 'bias' in k else 'not a LoRA matrix'}: "
                                      "only plain LoRA, lora_A and lora_B weights)")
            k = k.removeprefix(PEFT_PREFIX).replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")
            if k in tensors and not torch.equal(tensors[k], v):  # recent PEFT saves a resized embedding itself too
                raise CheckpointError(f"{path}: tensor {k} differs from the one in {os.path.basename(weights[0])}")
            tensors[k] = v
    return cfg, tensors


def import_peft(peft_dir, base, ctx=None) -> tuple:
    """(model, note): the base checkpoint with a PEFT LoRA adapter (+ trainable_params.bin) as this project's LoRA.

    ctx: the context the adapter was trained for; the RoPE factor is ceil(ctx / the base's pre-training context),
    as in LongLoRA's fine-tune.py and eval.py. None: read from a config.json next to the adapter (`lora.py peft`
    writes one), else refused.

    LongLoRA added a [PAD] token, so its embedding has one row more than LLaMA2's 32000 (vocab 32001). That
    last row is dropped (`note` says so): this project's tokenizer never produces id 32000, so the row is never
    looked up, and the logits of the 32000 real tokens are exactly those of LongLoRA's merged model. What is lost
    is the [PAD] logit. Its output row in LongLoRA's merged model (merge_lora_weights_and_save_hf_model.py) is
    the mean of the base's rows (lm_head does not train), so its logit is the mean of the others, its probability at most 1/32001 (Jensen), and each real
    token's log-probability here exceeds LongLoRA's by at most log(32001/32000) = 3.1e-5 nats.
    """
    cfg, hf = read_peft_dir(peft_dir)
    if ctx is None:
        config = os.path.join(peft_dir, "config.json")
        if not os.path.isfile(config):
            raise ValueError(f"{peft_dir}: a PEFT adapter does not record the context it was trained for; "
                             "pass --ctx (e.g. 32768 for LongLoRA's Llama-2-7b-longlora-32k)")
        try:
            args = ModelArgs(**hf_config_fields(read_json(config), config))
        except CheckpointError:
            raise
        except ValueError as e:  # fields of the right types that make no model (ModelArgs' checks)
            raise CheckpointError(f"{config}: {e}") from None
        if args.rope_scaling == 1.0:  # (dvlab-research/LongLoRA#181: some released repositories lack rope_scaling)
            raise ValueError(f"{config} records no RoPE scaling, so not the context the adapter was trained for; "
                             "pass --ctx (e.g. 32768 for LongLoRA's Llama-2-7b-longlora-32k)")
        ctx = args.max_seq_len
    model = Transformer.from_pretrained(base)
    args = model.args
    names = hf_key_map(args.n_layers)  # HF name -> our name
    ours, note = {}, ""
    for k, v in hf.items():
        module, lora, ab = k.rpartition(".lora_")[0], ".lora_" in k, k.rpartition(".lora_")[2][:1]
        key = names.get(module + ".weight" if lora else k)
        if key is None or (lora and ab not in "AB"):
            raise CheckpointError(f"{peft_dir}: unexpected tensor {k} (no such weight in a LLaMA with {args.n_layers} layers)")
        ours[key[: -len("weight")] + f"lora_{ab.lower()}" if lora else key] = v
    out = ours.pop("output.weight", None)  # recent PEFT saves the whole lm_head when the vocabulary was resized
    if out is not None and (out.shape[1:] != model.output.weight.shape[1:] or out.shape[0] not in (args.vocab_size, args.vocab_size + 1)):
        raise CheckpointError(f"{peft_dir}: tensor lm_head.weight has shape {tuple(out.shape)}, the base {base} has "
                              f"{tuple(model.output.weight.shape)}")
    if out is not None and not torch.equal(out[:args.vocab_size].float(), model.output.weight.float()):
        raise CheckpointError(f"{peft_dir}: lm_head.weight differs from the base's; an adapter here cannot carry a trained "
                              "output matrix (merge it with PEFT, then load the merged model)")
    emb = ours.get("tok_embeddings.weight")
    if emb is not None and tuple(emb.shape) == (args.vocab_size + 1, args.dim):
        ours["tok_embeddings.weight"] = emb[:-1]
        note = (f"dropped embedding row {args.vocab_size} (LongLoRA's added [PAD] token, which this tokenizer never "
                f"produces); the {args.vocab_size} real tokens' logits are unchanged")
    targets = [t for t in TARGETS if any(k.endswith(f".{t}.lora_a") or k == f"{t}.lora_a" for k in ours)]
    if not targets:
        raise CheckpointError(f"{peft_dir}: no LoRA tensors (lora_A / lora_B) found")
    apply_lora(model, r=cfg["r"], alpha=cfg["lora_alpha"], dropout=cfg["lora_dropout"], targets=targets)
    mark_trainable(model, embed="tok_embeddings.weight" in ours, norms=any(k.endswith("norm.weight") for k in ours))
    params = adapter_state(model)
    # Every LoRA matrix must be there; norms left out keep the base's values, as LongLoRA's strict=False load does.
    expected = {k: tuple(p.shape) for k, p in params.items() if k in ours or k.endswith(("lora_a", "lora_b"))}
    check_state_dict(ours, expected, f"{peft_dir} on base {base}")
    with torch.no_grad():
        for k, p in params.items():
            if k in ours:
                v = ours[k]
                if k.endswith(("attention.wq.lora_b", "attention.wk.lora_b")):  # B's rows in HF's q/k order: undo it
                    v = hf_to_meta_qk(v, args.n_heads if ".wq." in k else args.n_kv_heads)
                p.data = p.data.float()  # an adapter keeps what it imports exactly (load_adapter casts to the base dtype)
                p.copy_(v)
    if ctx > args.max_seq_len:
        args.extend_context(ctx)
    return model.eval(), note


# ----------------------------------------------------------------------------------------------------
# Command line


# Each command builds its result beside --out and renames it into place when complete (longlora/output.py):
# a kill leaves the old --out or none, never shards of two models.


def merge_command(a):
    model = load_model(a.base, a.adapter)  # in the checkpoint's own dtype
    args = model.args
    check_exportable(args, a.format)  # before the merge and the writing
    state = merge_lora(model.state_dict(), model.lora_config)
    with building(a.out, a.overwrite) as tmp:
        write_model(args, state, tmp, a.format, model.tokenizer.path if model.tokenizer else None, a.shard_size)
    print(f"merged {a.adapter} into {a.base} -> {a.out} ({a.format} layout; rope scaling {args.rope_scaling:g}, "
          f"context {args.max_seq_len})")


def peft_command(a):
    model = load_model(a.base, a.adapter)  # in the checkpoint's own dtype
    with building(a.out, a.overwrite) as tmp:
        write_peft(model, tmp)
    print(f"wrote PEFT adapter {a.out}. Load it on the HF base model with its config (RoPE scaling {model.args.rope_scaling:g}):\n"
          f"  config = AutoConfig.from_pretrained({a.out!r})\n"
          f"  base = AutoModelForCausalLM.from_pretrained(HF_BASE_MODEL, config=config)\n"
          f"  model = PeftModel.from_pretrained(base, {a.out!r})")


def import_command(a):
    model, note = import_peft(a.peft, a.base, a.ctx)
    args, cfg = model.args, model.lora_config
    with building(a.out, a.overwrite) as tmp:
        save_adapter(model, tmp, ctx=args.max_seq_len, extra={"imported_from": os.path.abspath(a.peft), "note": note})
    print(f"imported {a.peft} onto {a.base} -> {a.out}: LoRA r={cfg['r']} alpha={cfg['alpha']:g} on {' '.join(cfg['targets'])}"
          f"{', embeddings' if cfg['embed'] else ''}{', norms' if cfg['norms'] else ''}; rope scaling {args.rope_scaling:g}, "
          f"context {args.max_seq_len}")
    if note:
        print(f"note: {note}")


EXAMPLES = ["python lora.py merge --base llama-2-7b --adapter out/adapter --out llama-2-7b-32k",
            "python lora.py merge --base llama-2-7b --adapter out/adapter --out llama-2-7b-32k --format meta",
            "python lora.py peft --base llama-2-7b --adapter out/adapter --out llama-2-7b-32k-peft",
            "python lora.py import --peft Llama-2-7b-longlora-32k --base llama-2-7b-hf --ctx 32768 --out longlora-32k"]


@entry
def main(argv=None) -> int:
    p = Parser(description="Merge a LoRA adapter into its base model, convert it to PEFT's layout, "
                           "or import a PEFT / LongLoRA adapter.", examples=EXAMPLES)
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("merge", help="write the fine-tuned model (W + (alpha/r)·B·A) as a full checkpoint", examples=EXAMPLES[:2],
                       description="Write base + adapter as one plain checkpoint, with the RoPE scaling and context in its config.")
    m.add_argument("--base", required=True, help="base checkpoint directory (Meta, HF or this project's layout)")
    m.add_argument("--adapter", required=True, help="adapter directory written by train.py / save_adapter "
                                                       "(adapter.safetensors + adapter_config.json)")
    m.add_argument("--out", required=True, help="new output directory (an existing one only with --overwrite)")
    m.add_argument("--format", default="hf", choices=("hf", "meta", "own"),
                   help="hf: config.json + safetensors shards, loads in transformers (default); "
                        "meta: params.json + consolidated.00.pth; own: this project's params.json + model.safetensors")
    m.add_argument("--shard-size", default="5GB", help="largest safetensors shard for --format hf, e.g. 5GB, 500MB (default 5GB)")
    q = sub.add_parser("peft", help="write the adapter in PEFT's layout (adapter_model.safetensors + adapter_config.json)",
                       examples=EXAMPLES[2:3],
                       description="Convert an adapter to PEFT's LoRA layout, HF names, with embed and norms as modules_to_save.")
    q.add_argument("--base", required=True, help="base checkpoint directory the adapter was trained on (checked against the adapter)")
    q.add_argument("--adapter", required=True, help="adapter directory written by train.py / save_adapter")
    q.add_argument("--out", required=True, help="new output directory for the PEFT adapter")
    i = sub.add_parser("import", help="convert a PEFT LoRA adapter (LongLoRA's released weights) into this project's adapter",
                       examples=EXAMPLES[3:],
                       description="Read adapter_model.safetensors/.bin + adapter_config.json (+ LongLoRA's trainable_params.bin: "
                                   "embeddings and norms) and write adapter.safetensors + adapter_config.json for the base.")
    i.add_argument("--peft", required=True, help="PEFT adapter directory (e.g. LongLoRA's Llama-2-7b-longlora-32k)")
    i.add_argument("--base", required=True, help="the base checkpoint it was trained on (Meta, HF or this project's layout)")
    i.add_argument("--ctx", type=integer(1, MAX_CTX), help="the context it was fine-tuned for (LongLoRA's --context_size, e.g. 32768); "
                   "RoPE factor ceil(ctx / base context). Default: read from a config.json in --peft")
    i.add_argument("--out", required=True, help="new output directory for the adapter")
    for s in (m, q, i):
        s.add_argument("--overwrite", action="store_true", help="replace --out if it holds a result this project wrote "
                       "(the new one takes its place only when complete)")
    a = p.parse_args(argv)
    src = ("--peft", a.peft) if a.command == "import" else ("--adapter", a.adapter)
    check_output(a.out, "--out", is_dir=True, inputs=[("--base", a.base), src], overwrite=a.overwrite)
    if a.command == "merge":
        try:
            parse_size(a.shard_size)
        except ValueError as e:
            raise UsageError(f"--shard-size {e}") from None
        merge_command(a)
    elif a.command == "peft":
        peft_command(a)
    else:
        import_command(a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
