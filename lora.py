"""
LoRA for context extension (LongLoRA's "LoRA+"), written out by hand: the layer, what trains, the merge.

The idea. Fine-tuning changes each weight matrix W (out x in) by some ΔW. LoRA bets that ΔW has low
rank and writes it as a product of two thin matrices, ΔW = (α/r)·B·A, B (out x r), A (r x in), r ≪ in.
Only A and B train; W stays frozen. For LLaMA2-7B with r=8 on wq wk wv wo that is 65.5k numbers per
matrix, 8.4M in all, 0.12% of the model's 6.74B, so gradients and optimizer state are tiny.

LongLoRA's finding ("LoRA+"). LoRA alone extends the context poorly: 7B at 32k tokens reaches PG19
perplexity 11.44 with LoRA on the attention projections, 8.12 when the token embeddings and every
RMSNorm train as well, 8.08 with full fine-tuning. Embeddings and norms are ~2% of 7B's parameters, so
`mark_trainable` turns them on by default (not `output`, which the paper leaves frozen).

What this file gives you:

    model = Transformer.from_pretrained("llama-2-7b", dtype=torch.bfloat16)
    apply_lora(model, r=8, alpha=16)         # wq wk wv wo become LoRALinear; logits unchanged
    mark_trainable(model)                    # LoRA + tok_embeddings + norms train, the rest is frozen
    ... train (train.py) ...
    adapter_state(model)                     # what the fine-tuning added: saved as an adapter (longlora/adapter.py)
    merged = merge_lora(model.state_dict(), model.lora_config)  # plain state dict, W + (α/r)·B·A

Export and import from the command line (longlora/export.py: HF layout loads in `transformers`, PEFT layout in
`peft`; `import` reads LongLoRA's released LoRA weights):

    python lora.py merge  --base llama-2-7b --adapter out/adapter --out llama-2-7b-32k            # HF layout
    python lora.py peft   --base llama-2-7b --adapter out/adapter --out llama-2-7b-32k-peft
    python lora.py import --peft Llama-2-7b-longlora-32k --base llama-2-7b-hf --ctx 32768 --out longlora-32k
"""

import math
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import RMSNorm, Transformer

# Linear layers that can carry LoRA: the attention projections (LongLoRA's default), the SwiGLU
# matrices, and the output head.
TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3", "output")
DEFAULT_TARGETS = ("wq", "wk", "wv", "wo")


# ----------------------------------------------------------------------------------------------------
# The LoRA layer


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update.

        x (..., in)
        │
        ├─────────────────► W (out, in), frozen ─────────────────────┐
        │                                                            ▼
        └─► dropout ─► A (r, in) ─► B (out, r) ─► · α/r ──────────► (+) ──► y (..., out)
                         A·x (..., r)   B·A·x (..., out)

        y = W·x + b + (α/r)·B·A·x         (b: the frozen bias, where the layer has one)

    Shapes for LLaMA2-7B's wq with r=8: W (4096, 4096) = 16.8M frozen numbers; A (8, 4096) and
    B (4096, 8) = 65.5k trainable ones.

    * B starts at zero, so a fresh LoRALinear computes exactly W·x: training starts from the base model.
      A starts Kaiming-uniform (as nn.Linear and PEFT do) so the gradient of B is not zero either.
    * Dropout is applied to the LoRA branch's input only; the frozen path sees x untouched.
    * The module owns the base `weight` parameter itself (composition, as in torchtune) rather than
      wrapping the nn.Linear, so the state-dict key stays `layers.0.attention.wq.weight` and a merged
      state dict loads into a plain Transformer unchanged.
    * dtype: A and B are fp32 even when W is bf16. They are the parameters the optimizer updates, and
      AdamW's tiny steps vanish in bf16 rounding (bf16 has 8 bits of mantissa). The LoRA branch is
      computed in their dtype and cast to x's before the sum, so the output dtype is the base dtype; in
      training on a GPU FSDP2 (param_dtype) and torch.autocast make that computation bf16 (docs/gpu.md).
    * A model built on the meta device gets its LoRA matrices on meta too; after `to_empty()` call
      `reset_lora_parameters()` on each layer (Transformer.init_weights would make B nonzero).
    """

    def __init__(self, weight: nn.Parameter, r: int = 8, alpha: float = 16, dropout: float = 0.0, bias=None):
        super().__init__()
        if r < 1:
            raise ValueError(f"LoRA rank r must be >= 1, got {r}")
        out_features, in_features = weight.shape
        self.weight = weight  # the very same Parameter object: tied weights stay tied, devices stay put
        self.bias = bias  # frozen with W (Qwen2's q, k, v); the update B·A has none, so a merge keeps it as it is
        self.r, self.alpha, self.scale = r, alpha, alpha / r
        # Created next to the base weight: after from_pretrained (meta device + assign=True) that is the
        # real device; on a model still on the meta device they stay on meta until reset_lora_parameters().
        self.lora_a = nn.Parameter(torch.empty(r, in_features, device=weight.device, dtype=torch.float32))
        self.lora_b = nn.Parameter(torch.empty(out_features, r, device=weight.device, dtype=torch.float32))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        if weight.device.type != "meta":
            self.reset_lora_parameters()

    def reset_lora_parameters(self):
        init_lora_(self.lora_a, self.lora_b)

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)  # (..., out), the frozen path
        h = self.dropout(x).to(self.lora_a.dtype)  # (..., in)
        lora = F.linear(F.linear(h, self.lora_a), self.lora_b)  # (..., r) -> (..., out); never forms B·A
        # y + (α/r)·lora, in place: at long context each (..., out) temporary is as large as a layer's input, and
        # backward needs neither y nor lora (the same numbers as out of place)
        return y.add_(lora.mul_(self.scale).to(y.dtype))

    def extra_repr(self):
        out_features, in_features = self.weight.shape
        return f"in={in_features}, out={out_features}, r={self.r}, alpha={self.alpha:g}"


def init_lora_(lora_a, lora_b):
    """In place: A Kaiming-uniform, B zero. Also used on full-size CPU tensors when the model is sharded (longlora/shard.py)."""
    nn.init.kaiming_uniform_(lora_a, a=math.sqrt(5))  # uniform(±1/sqrt(in)), nn.Linear's default
    nn.init.zeros_(lora_b)


def apply_lora(model: Transformer, r: int = 8, alpha: float = 16, dropout: float = 0.0,
               targets=DEFAULT_TARGETS) -> Transformer:
    """Replace every nn.Linear named in `targets` by a LoRALinear, in place. The logits do not change.

    Defaults are LongLoRA's: r=8, α=16, dropout 0, the four attention projections. Records the settings
    in `model.lora_config` (adapter_state and merge_lora read them there; so do adapter files).
    """
    targets = tuple(targets)
    bad = [t for t in targets if t not in TARGETS]
    if bad or not targets:
        raise ValueError(f"unknown LoRA target {bad[0] if bad else '(none)'!r}; choose from {', '.join(TARGETS)}")
    if getattr(model, "lora_config", None) is not None:
        raise ValueError("the model already has LoRA layers; apply_lora once per model")
    if "output" in targets and model.args.tie_embeddings:
        raise ValueError("cannot put LoRA on `output` when it is tied to tok_embeddings")
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in targets and isinstance(child, nn.Linear):
                setattr(module, child_name, LoRALinear(child.weight, r, alpha, dropout, child.bias))
    # What trains besides the LoRA matrices; mark_trainable sets it, save_adapter reads it.
    model.lora_config = dict(r=r, alpha=alpha, dropout=dropout, targets=list(targets), embed=False, norms=False)
    return model


def lora_modules(model):
    """(name, LoRALinear) pairs, e.g. ("layers.0.attention.wq", ...)."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def mark_trainable(model: Transformer, embed: bool = True, norms: bool = True):
    """Freeze everything but the LoRA matrices and, by default, tok_embeddings and every RMSNorm
    (LongLoRA's LoRA+). Returns (n_trainable, n_total); see `trainable_summary` for a printable line.

    The dtypes are left alone: with a bf16 base, the embedding and the norms train in bf16 unless the
    training loop keeps fp32 master weights (train.py's business).
    """
    if getattr(model, "lora_config", None) is None:
        raise ValueError("the model has no LoRA layers; call apply_lora(model) first")
    model.requires_grad_(False)
    for _, m in lora_modules(model):
        m.lora_a.requires_grad_(True)
        m.lora_b.requires_grad_(True)
    if embed:
        model.tok_embeddings.weight.requires_grad_(True)
    if norms:
        for m in model.modules():
            if isinstance(m, RMSNorm):
                m.weight.requires_grad_(True)
    model.lora_config.update(embed=embed, norms=norms)
    params = {id(p): p for p in model.parameters()}.values()  # a tied weight counts once
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def trainable_summary(model) -> str:
    """For LLaMA2-7B with the defaults: 'trainable: 8.39M LoRA + 131.34M other = 139.73M of 6.75B
    parameters (2.07%)'; with mark_trainable(model, embed=False, norms=False) the share is 0.12%."""
    params = {id(p): (n, p) for n, p in model.named_parameters()}.values()
    lora = sum(p.numel() for n, p in params if p.requires_grad and n.endswith(("lora_a", "lora_b")))
    other = sum(p.numel() for n, p in params if p.requires_grad and not n.endswith(("lora_a", "lora_b")))
    total = sum(p.numel() for _, p in params)
    fmt = lambda n: f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k" if n >= 1e3 else str(n)
    return (f"trainable: {fmt(lora)} LoRA + {fmt(other)} other = {fmt(lora + other)} "
            f"of {fmt(total)} parameters ({100 * (lora + other) / total:.2f}%)")


# ----------------------------------------------------------------------------------------------------
# Merge: W' = W + (α/r)·B·A


def merge_lora(state_dict: dict, alpha_over_r) -> dict:
    """A plain state dict (no lora_a / lora_b keys) from a LoRA model's state dict. Pure: inputs untouched.

    alpha_over_r: the scale α/r as a number, or a dict holding "r" and "alpha" (model.lora_config or an
    adapter_config.json). The product is computed in fp32 and cast back to W's dtype, so a bf16 model is
    rounded once, not once per term.
    """
    if isinstance(alpha_over_r, dict):
        scale = alpha_over_r["alpha"] / alpha_over_r["r"]
    else:
        scale = float(alpha_over_r)
    out = {}
    for key, w in state_dict.items():
        if key.endswith((".lora_a", ".lora_b")):
            continue
        prefix = key[: -len("weight")]
        a, b = state_dict.get(prefix + "lora_a"), state_dict.get(prefix + "lora_b")
        if key.endswith(".weight") and (a is not None or b is not None):
            if a is None or b is None:
                raise ValueError(f"{prefix}lora_{'a' if a is None else 'b'} is missing: cannot merge {key}")
            if (b.shape[0], a.shape[1]) != tuple(w.shape) or a.shape[0] != b.shape[1]:
                raise ValueError(f"cannot merge {key} {tuple(w.shape)} with B {tuple(b.shape)} · A {tuple(a.shape)}")
            w = (w.float() + scale * (b.float() @ a.float())).to(w.dtype)  # (out, r) @ (r, in) -> (out, in)
        out[key] = w
    stray = [k for k in state_dict if k.endswith((".lora_a", ".lora_b")) and k[:-len("lora_a")] + "weight" not in state_dict]
    if stray:
        raise ValueError(f"{stray[0]} has no base weight to merge into")
    return out


# ----------------------------------------------------------------------------------------------------
# The adapter: what a fine-tuned model adds to its base


def in_adapter(key: str, embed: bool, norms: bool) -> bool:
    """Whether a state-dict key belongs in an adapter: every lora_a / lora_b, plus tok_embeddings and the
    norms if they trained. The frozen base weights never do."""
    return (key.endswith((".lora_a", ".lora_b")) or (embed and key == "tok_embeddings.weight")
            or (norms and key.endswith("norm.weight")))


def adapter_state(model) -> dict:
    """The tensors an adapter holds, by state-dict name (they share storage with the model's parameters)."""
    cfg = model.lora_config
    return {k: v for k, v in model.state_dict().items() if in_adapter(k, cfg["embed"], cfg["norms"])}


if __name__ == "__main__":  # merge, peft and import: the command line lives in longlora/export.py
    from longlora.export import main

    sys.exit(main())
