"""
LLaMA in plain PyTorch (LLaMA 2 and 3, Mistral, Qwen2: docs/models.md), readable top to bottom, loading official weights.

    tokens (B, T)
      -> tok_embeddings                                   (B, T, dim)
      -> n_layers x [ h = h + attention(attention_norm(h))     # RoPE, grouped-query attention
                      h = h + feed_forward(ffn_norm(h)) ]      # SwiGLU
      -> norm -> output                                   (B, T, vocab_size)

The parameter names are Meta's (`tok_embeddings`, `layers.N.attention.wq`, `feed_forward.w1`, ...), so
Meta's `consolidated.NN.pth` shards load by identity; HF checkpoints go through one small, visible key map
(longlora/weights.py, which reads and writes every checkpoint format).

Context extension (LongLoRA) changes two things only:
  * RoPE positions are divided by `rope_scaling` (linear position interpolation): with factor 8 a
    model trained on 4096 positions sees 32768 tokens as positions 0, 0.125, 0.25, ... < 4096.
    Extending to ctx tokens uses factor ceil(ctx / the pre-training context), as LongLoRA's fine-tune.py
    does (`ModelArgs.extend_context`);
  * training may use a sparse attention pattern (S²-Attn or SF-Attn, see attention.py) selected by
    `ModelArgs.attn`; evaluation and generation use full attention.

Training at long context sets `model.lean = True`: the same numbers through longlora/memory.py, which keeps far
less for backward (checkpointed blocks, norms and chunks); the forward below is the specification it follows.

    model = Transformer.from_pretrained("/path/to/llama-2-7b")   # Meta, HF or this project's layout
    logits = model(tokens)                  # (B, T, vocab_size)
    loss = model(tokens, targets)           # mean cross-entropy; targets == -100 are ignored
"""

import math
from dataclasses import asdict, dataclass, fields
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from attention import attention
from longlora import memory
from longlora.weights import load_into, load_tokenizer, read_checkpoint, write_model


# ----------------------------------------------------------------------------------------------------
# Configuration


@dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: Optional[int] = None  # None = n_heads (no grouped-query attention)
    vocab_size: int = 32000
    multiple_of: int = 256  # SwiGLU hidden size is rounded up to a multiple of this
    ffn_dim_multiplier: Optional[float] = None
    ffn_hidden_dim: Optional[int] = None  # set explicitly by HF configs (`intermediate_size`)
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # Llama 3.1's frequency rule (config.json's rope type "llama3", see rope_frequencies); factor 1.0 = off
    llama3_factor: float = 1.0
    llama3_low_freq_factor: float = 1.0
    llama3_high_freq_factor: float = 4.0
    llama3_context: int = 8192  # the context its wavelength bounds are counted in (original_max_position_embeddings)
    rope_scaling: float = 1.0  # linear position interpolation factor; 1.0 = none
    max_seq_len: int = 4096  # the context the weights are meant for (after scaling)
    original_max_seq_len: Optional[int] = None  # the pre-training context rope_scaling stretches; None = max_seq_len / rope_scaling
    tie_embeddings: bool = False  # output shares tok_embeddings.weight (some small HF models)
    qkv_bias: bool = False  # wq, wk and wv add a bias (Qwen2); wo never does
    # Attention used by forward() without a KV cache; see attention.py.
    attn: str = "full"  # "full" | "s2" (LongLoRA) | "sf" (SinkLoRA)
    group_size: Optional[int] = None  # None = a quarter of the sequence, LongLoRA's ratio
    sink_tokens: int = 4  # global tokens of "sf"
    shift_wrap: bool = False  # the paper's cyclic roll (leaks future tokens; ablation only)

    def __post_init__(self):
        for f in fields(self):  # values read from a config file: a number must be a number, finite and > 0
            v = getattr(self, f.name)
            if f.name != "attn" and not (v is None or isinstance(v, int if type(f.default) is int else (int, float))):
                raise ValueError(f"{f.name} must be a number, got {v!r}")
            if type(v) in (int, float) and not (math.isfinite(v) and (v > 0 or (f.name == "sink_tokens" and v == 0))):
                raise ValueError(f"{f.name} must be a finite number > 0, got {v!r}")
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.dim % self.n_heads:
            raise ValueError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        if (self.dim // self.n_heads) % 2:
            raise ValueError(f"head dim {self.dim // self.n_heads} must be even for RoPE")
        if self.rope_scaling < 1.0 or self.llama3_factor < 1.0:
            raise ValueError(f"rope_scaling and llama3_factor must be >= 1, got {self.rope_scaling}, {self.llama3_factor}")
        if self.llama3_high_freq_factor <= self.llama3_low_freq_factor:
            raise ValueError(f"llama3_high_freq_factor {self.llama3_high_freq_factor:g} must exceed llama3_low_freq_factor "
                             f"{self.llama3_low_freq_factor:g}")
        if self.original_max_seq_len is None:
            self.original_max_seq_len = round(self.max_seq_len / self.rope_scaling)

    def extend_context(self, ctx: int):
        """Stretch RoPE to ctx tokens: factor ceil(ctx / the pre-training context), LongLoRA's fine-tune.py rule.

        The factor is counted from the pre-training context, not from the current one: a 32k model (LLaMA2's
        4096 x 8) extended to 64k gets ceil(65536 / 4096) = 16, to 100k ceil(100000 / 4096) = 25. LongLoRA's
        fine-tune.py divides by the config's 4096 x 8 instead and writes the quotient (2) as the new factor,
        replacing the 8; our reading: a slip, since a factor of 2 undoes the model's training.
        """
        self.rope_scaling = float(math.ceil(ctx / self.original_max_seq_len))
        self.max_seq_len = ctx

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def hidden_dim(self) -> int:
        """SwiGLU width, computed the way Meta did: 2/3 of 4*dim, times a multiplier, rounded up."""
        if self.ffn_hidden_dim is not None:
            return self.ffn_hidden_dim
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)


# Official shapes (hidden_dim: 11008 / 13824 / 28672) and small models for tests and the CPU demo.
PRESETS = {
    "llama2-7b": dict(dim=4096, n_layers=32, n_heads=32),
    "llama2-13b": dict(dim=5120, n_layers=40, n_heads=40),
    "llama2-70b": dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim_multiplier=1.3, multiple_of=4096),
    "demo": dict(dim=192, n_layers=4, n_heads=6, vocab_size=2048, multiple_of=32, max_seq_len=256),
    "tiny": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, multiple_of=32, max_seq_len=128),
}


def preset(name: str, **overrides) -> ModelArgs:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return ModelArgs(**{**PRESETS[name], **overrides})


# ----------------------------------------------------------------------------------------------------
# Building blocks


class RMSNorm(nn.Module):
    """x / rms(x) * weight. No mean subtraction and no bias, unlike LayerNorm; computed in fp32."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):  # (..., dim)
        xf = x.float()  # normalise in fp32, round to x's dtype, then scale: HF's LlamaRMSNorm, op for op
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rope_frequencies(args: ModelArgs, device=None) -> torch.Tensor:
    """inv_freq (head_dim/2,), fp32: pair i of a head (dimensions 2i and 2i+1) turns theta^(-2i/head_dim) radians
    per position, so its wavelength is 2π/inv_freq[i] positions (from ~6 to millions).

    Llama 3.1's rule (llama3_factor > 1) interpolates only the slow pairs. A pair whose wavelength exceeds
    llama3_context / low_freq_factor positions never turned far within the pre-training context: its frequency
    is divided by the factor (position interpolation for that pair alone). A pair shorter than
    llama3_context / high_freq_factor turned many times and keeps its frequency: it encodes nearby order. In
    between, a blend whose weight runs linearly in llama3_context / wavelength from 0 to 1.
    """
    a = args
    inv_freq = 1.0 / (a.rope_theta ** (torch.arange(0, a.head_dim, 2, device=device).float() / a.head_dim))  # (D/2,)
    if a.llama3_factor == 1.0:
        return inv_freq
    turns = a.llama3_context / (2 * math.pi / inv_freq)  # turns in the pre-training context (D/2,)
    keep = ((turns - a.llama3_low_freq_factor) / (a.llama3_high_freq_factor - a.llama3_low_freq_factor)).clamp(0, 1)
    return (1 - keep) * inv_freq / a.llama3_factor + keep * inv_freq  # keep 0: divided; 1: unchanged


def rope_angles(positions: torch.Tensor, inv_freq: torch.Tensor, scaling: float = 1.0):
    """cos and sin of the rotation angles, each (T, head_dim/2), in fp32.

    Linear position interpolation divides the positions by `scaling`, so every angle stays within what the model
    saw during pre-training. On a Llama 3.1 frequency rule it composes: inv_freq_llama3 / scaling for every pair.
    """
    angles = torch.outer(positions.float() / scaling, inv_freq)  # (T, head_dim/2)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each pair (x[2i], x[2i+1]) of x (B, T, H, D) by its angle. Real arithmetic, Meta's layout.

    This is Meta's complex multiplication (x0 + i*x1) * (cos + i*sin) written with real numbers, which
    keeps the model free of complex tensors (they break some collectives and exporters).
    """
    xf = x.float().unflatten(-1, (-1, 2))  # (B, T, H, D/2, 2)
    x0, x1 = xf[..., 0], xf[..., 1]  # (B, T, H, D/2)
    cos, sin = cos[:, None, :], sin[:, None, :]  # (T, 1, D/2): broadcast over batch and heads
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)  # (B, T, H, D/2, 2)
    return out.flatten(-2).type_as(x)


def rope_rotate(args: ModelArgs, positions: torch.Tensor, apply=apply_rope):
    """rotate(x, p): RoPE of x (B, T, H, D) by positions p, for one forward pass, with `apply` (apply_rope).

    The cos and sin of `positions` (the forward's own) are computed here, once, and every layer reuses them,
    instead of recomputing the same angles for q and for k in every layer (a fifth of a decoding step's few
    hundred small kernels). Other positions (the sink cache rotates by index in the cache) are computed on demand.
    """
    inv_freq = rope_frequencies(args, positions.device)
    cos, sin = rope_angles(positions, inv_freq, args.rope_scaling)  # (T, D/2) each
    on = {positions.device: (cos, sin)}  # and copied once to each further device of a split model (longlora/devices.py)

    def rotate(x, p):
        if p is positions:
            return apply(x, *(on.get(x.device) or on.setdefault(x.device, (cos.to(x.device), sin.to(x.device)))))
        return apply(x, *rope_angles(p, inv_freq.to(p.device), args.rope_scaling))

    return rotate


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__()
        self.args = args  # shared with the model, so switching args.attn switches every layer
        self.layer_id = layer_id
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        # Qwen2 adds a bias to q, k and v (not to wo), before RoPE as in HF's Qwen2: it is rotated with the rest
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=args.qkv_bias)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=args.qkv_bias)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=args.qkv_bias)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)

    def forward(self, x, positions, lengths=None, cache=None, rotate=None):
        """rotate: the forward's rope_rotate, shared by all layers; a layer called alone makes its own."""
        rotate = rotate or rope_rotate(self.args, positions)
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)  # (B, T, H, D)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, H_kv, D)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, H_kv, D)
        if cache is not None:
            # Incremental decoding: the cache decides which past keys the new queries see (and when
            # to rotate them, see the sink cache in longlora/caches.py), so it receives q and k before RoPE.
            y = cache.attend(self.layer_id, q, k, v, positions, rotate)
        else:
            q, k = rotate(q, positions), rotate(k, positions)
            a = self.args
            y = attention(q, k, v, mode=a.attn, group_size=a.group_size, sink_tokens=a.sink_tokens,
                          wrap=a.shift_wrap, lengths=lengths)  # (B, T, H, D)
        del q, k, v  # attention saved what its backward needs; the rest need not wait through wo
        return self.wo(y.reshape(B, T, self.n_heads * self.head_dim))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x), with a hidden width of about 8/3 dim."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)  # gate
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)  # down
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)  # up

    def forward(self, x):  # (B, T, dim)
        return self.w2(F.silu(self.w1(x)) * self.w3(x))  # (B, T, hidden_dim) inside


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__()
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = Attention(args, layer_id)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = FeedForward(args.dim, args.hidden_dim)

    def forward(self, x, positions, lengths=None, cache=None, rotate=None, lean=False):
        if lean:  # the same two lines with less kept for backward (longlora/memory.py)
            return memory.lean_block(self, x, positions, lengths, rotate)
        x = x.to(self.attention_norm.weight.device)  # a model split over devices (longlora/devices.py); else a no-op
        h = x + self.attention(self.attention_norm(x), positions, lengths, cache, rotate)
        return h + self.feed_forward(self.ffn_norm(h))


# ----------------------------------------------------------------------------------------------------
# KV cache for generation


class KVCache:
    """Preallocated keys and values of every layer, written at [pos : pos+T] as in Meta's reference.

    A cache decides what the new queries attend to. This one keeps everything, so decoding token by
    token gives the same logits as one full forward. longlora/caches.py has caches that evict tokens (H₂O,
    attention sinks) with the same `attend` method; sample.py chooses one.
    """

    def __init__(self, args: ModelArgs, batch_size: int, max_len: int, device=None, dtype=torch.float32):
        shape = (batch_size, max_len, args.n_kv_heads, args.head_dim)
        devices = device if isinstance(device, list) else [device] * args.n_layers  # a list: each layer's own
        self.k = [torch.zeros(shape, device=d, dtype=dtype) for d in devices]
        self.v = [torch.zeros(shape, device=d, dtype=dtype) for d in devices]
        self.max_len = max_len
        self.pos = 0  # number of tokens already in the cache; advanced by Transformer.forward

    def attend(self, layer_id, q, k, v, positions, rotate):
        B, T, H, D = q.shape
        if self.pos + T > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} tokens; cannot add {T} after {self.pos}")
        q, k = rotate(q, positions), rotate(k, positions)
        self.k[layer_id][:B, self.pos:self.pos + T] = k
        self.v[layer_id][:B, self.pos:self.pos + T] = v
        keys = self.k[layer_id][:B, :self.pos + T]  # (B, S, H_kv, D), S = pos + T
        values = self.v[layer_id][:B, :self.pos + T]
        qt, kt, vt = q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2)  # (B, heads, S or T, D)
        # New query t sits at absolute position pos + t and may see keys 0 .. pos + t. One new token sees
        # the whole cache, so the common decoding step needs no mask at all.
        mask = None
        if T > 1:
            mask = torch.ones(T, self.pos + T, dtype=torch.bool, device=q.device).tril(diagonal=self.pos)
        # enable_gqa: query head h uses key/value head h // (H / H_kv) (grouped-query attention), without a copy
        y = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, enable_gqa=H != keys.shape[2])  # (B, H, T, D)
        return y.transpose(1, 2)  # (B, T, H, D)


# ----------------------------------------------------------------------------------------------------
# The model


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args, i) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        # Memory-lean training (train.py turns it on): the same forward with far less kept for backward, see forward
        self.lean = False
        self.gradient_checkpointing = False  # with lean: recompute each block in backward
        self.offload_activations = False  # with checkpointing: keep the blocks' inputs in host memory
        self.tokenizer = None  # set by from_pretrained when a tokenizer sits next to the weights
        self.init_weights()

    def init_weights(self):
        """GPT-style init for training from scratch: N(0, 0.02), residual projections scaled down by depth."""
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            else:
                std = 0.02 / math.sqrt(2 * self.args.n_layers) if name.endswith(("wo.weight", "w2.weight")) else 0.02
                nn.init.normal_(p, mean=0.0, std=std)

    def forward(self, tokens, targets=None, *, lengths=None, cache=None, reduction="mean"):
        """tokens (B, T) -> logits (B, T, vocab_size); with targets (B, T) the cross-entropy instead, in fp32:
        its mean over the targets that are not -100 (reduction "mean") or its sum ("sum"). No logits then.

        lengths (B,): valid tokens per row when rows are right-padded (padded keys are never attended).
        cache: a KVCache; the tokens continue the sequence already in it.
        """
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        B, T = tokens.shape
        start = cache.pos if cache is not None else 0
        positions = torch.arange(start, start + T, device=tokens.device)
        # cos/sin once for all layers; lean: applied CHUNK_SIZE tokens at a time (longlora/memory.py)
        rotate = rope_rotate(self.args, positions, memory.rope_in_chunks(apply_rope) if self.lean else apply_rope)
        if torch.is_tensor(lengths):
            # read to the host once here, not in every layer (each read waits for the device); attention.py
            # builds its masks and packed indices from these ints once and reuses them in every layer
            lengths = tuple(lengths.tolist())
        h = self.tok_embeddings(tokens)  # (B, T, dim)
        if torch.is_autocast_enabled(h.device.type):  # the residual stream in the compute dtype, as under FSDP's bf16
            h = h.to(torch.get_autocast_dtype(h.device.type))
        if self.lean and cache is None:
            # Training at long context: the same numbers as the plain path below, far less kept for backward: each
            # block recomputed (its input optionally in host memory), norms keeping only their input, RoPE, the
            # feed-forward and the loss in chunks (longlora/memory.py).
            h = memory.lean_layers(self, h, positions, lengths, rotate)
            if targets is None:
                return self.output(memory.rms_norm(h, self.norm))  # (B, T, vocab_size)
            loss = memory.loss_in_chunks(self.norm, self.output, h, targets)  # summed, fp32
        else:
            for layer in self.layers:
                h = layer(h, positions, lengths, cache, rotate)
            if cache is not None:
                cache.pos += T
            logits = self.output(self.norm(h))  # (B, T, vocab_size)
            if targets is None:
                return logits
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100, reduction="sum")
        # "sum" lets a caller divide by the target count of a whole batch (gradient accumulation, several ranks)
        return loss if reduction == "sum" else loss / (targets != -100).sum()

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())  # tied weights are counted once

    @classmethod
    def from_pretrained(cls, path, dtype=None, device=None, checkpoint=None, **overrides) -> "Transformer":
        """Load Meta (`params.json` + `consolidated.NN.pth`), HF (`config.json` + `*.safetensors`) or this
        project's layout (`params.json` + `model.safetensors`), strictly: a missing, unexpected or mis-shaped
        tensor is an error naming it. `overrides` replace ModelArgs fields. Built on the meta device and filled
        one block at a time from the memory-mapped files, so loading needs one copy of the weights, not two.
        checkpoint: read_checkpoint(path)'s result, if the caller has it already."""
        args, weights = checkpoint or read_checkpoint(path, ModelArgs)  # the config, the tensors' shapes (no data yet)
        with torch.device("meta"):
            model = cls(ModelArgs(**{**asdict(args), **overrides}))
        load_into(model, weights, path, dtype, device)
        model.tokenizer = load_tokenizer(path, args.vocab_size)  # None without a tokenizer
        return model

    def save_pretrained(self, out_dir, tokenizer_path=None):
        """This project's layout: Meta's names and a params.json, the tensors in one safetensors file."""
        write_model(self.args, self.state_dict(), out_dir, "own", tokenizer_path)
