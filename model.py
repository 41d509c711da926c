"""
LLaMA2 in plain PyTorch, readable top to bottom, and able to load the official weights.

    tokens (B, T)
      -> tok_embeddings                                   (B, T, dim)
      -> n_layers x [ h = h + attention(attention_norm(h))     # RoPE, grouped-query attention
                      h = h + feed_forward(ffn_norm(h)) ]      # SwiGLU
      -> norm -> output                                   (B, T, vocab_size)

The parameter names are Meta's (`tok_embeddings`, `layers.N.attention.wq`, `feed_forward.w1`, ...), so
Meta's `consolidated.NN.pth` shards load by identity; HF checkpoints go through one small, visible key map.

Context extension (LongLoRA) changes two things only:
  * RoPE positions are divided by `rope_scaling` (linear position interpolation): with factor 8 a
    model trained on 4096 positions sees 32768 tokens as positions 0, 0.125, 0.25, ... < 4096.
    Extending to ctx tokens uses factor ceil(ctx / the pre-training context), as LongLoRA's fine-tune.py
    does (`ModelArgs.extend_context`). An HF config.json states the contexts in one of two ways:
    `original_max_position_embeddings` present (this project's exports): `max_position_embeddings` is the
    context; absent (LongLoRA's released models, 4096 + linear 8 for 32k): the context is
    max_position_embeddings x factor (our reading; see `hf_config_to_args`);
  * training may use a sparse attention pattern (S²-Attn or SF-Attn, see attention.py) selected by
    `ModelArgs.attn`; evaluation and generation use full attention.

Usage:
    python model.py --preset tiny                      # build a random tiny model and run it (no weights needed)
    python model.py --model /path/to/llama-2-7b-hf --prompt "The capital of France is"

    model = Transformer.from_pretrained("/path/to/llama-2-7b")   # Meta, HF or this project's layout
    logits = model(tokens)                  # (B, T, vocab_size)
    loss = model(tokens, targets)           # mean cross-entropy; targets == -100 are ignored
"""

import contextlib
import itertools
import json
import math
import os
import sys
from dataclasses import asdict, dataclass, fields
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from attention import attention
from cli import Parser, entry, one_line


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
    rope_scaling: float = 1.0  # linear position interpolation factor; 1.0 = none
    max_seq_len: int = 4096  # the context the weights are meant for (after scaling)
    original_max_seq_len: Optional[int] = None  # the pre-training context rope_scaling stretches; None = max_seq_len / rope_scaling
    tie_embeddings: bool = False  # output shares tok_embeddings.weight (some small HF models)
    # Attention used by forward() without a KV cache; see attention.py.
    attn: str = "full"  # "full" | "s2" (LongLoRA) | "sf" (SinkLoRA)
    group_size: Optional[int] = None  # None = a quarter of the sequence, LongLoRA's ratio
    sink_tokens: int = 4  # global tokens of "sf"
    shift_wrap: bool = False  # the paper's cyclic roll (leaks future tokens; ablation only)

    def __post_init__(self):
        for f in fields(self):  # values read from a config file: a number must be a number
            v = getattr(self, f.name)
            if f.name != "attn" and not (v is None or isinstance(v, int if type(f.default) is int else (int, float))):
                raise ValueError(f"{f.name} must be a number, got {v!r}")
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.dim % self.n_heads:
            raise ValueError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        if (self.dim // self.n_heads) % 2:
            raise ValueError(f"head dim {self.dim // self.n_heads} must be even for RoPE")
        if self.rope_scaling < 1.0:
            raise ValueError(f"rope_scaling must be >= 1, got {self.rope_scaling}")
        if self.original_max_seq_len is None:
            self.original_max_seq_len = round(self.max_seq_len / self.rope_scaling)

    def extend_context(self, ctx: int):
        """Stretch RoPE to ctx tokens: factor ceil(ctx / the pre-training context), LongLoRA's fine-tune.py rule.

        The factor is counted from the pre-training context, not from the current one: a 32k model (LLaMA2's
        4096 x 8) extended to 64k gets ceil(65536 / 4096) = 16, to 100k ceil(100000 / 4096) = 25, as fine-tune.py
        computed it until Nov 2023. Since then it divides by 4096 x 8 and writes the quotient (2) as the new
        factor, replacing the 8; our reading: a slip, since a factor of 2 undoes the model's training.
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


# Tokens per mini-sequence of the feed-forward and of the loss (see FeedForward and Transformer.forward), and per
# piece of RoPE and of the RMSNorms' backward (apply_rope, RMSNormFunction).
CHUNK_SIZE = 1024


class RMSNormFunction(torch.autograd.Function):
    """x / rms(x) * weight with a hand-written backward that keeps less for it.

    Written as plain tensor ops, autograd would keep per token the fp32 copy of x (4·dim bytes), the rsqrt and
    the normalised x in x's dtype (2·dim in bf16), for each of the 2 norms of every layer. This keeps only x
    itself and the fp32 rsqrt (4 bytes per token), and recomputes the normalised x in backward. The first norm
    of a block gets the block's input, which activation checkpointing keeps anyway, so that x costs nothing
    extra. Backward works on CHUNK_SIZE tokens at a time: its fp32 temporaries (4·dim bytes per token each)
    for a whole long sequence would be among the largest tensors of the step.

    With x̂ = x·r, r = 1/sqrt(mean(x²) + eps) and g the gradient arriving at x̂ (the output's gradient times
    weight):  dL/dweight = Σ_tokens grad_out·x̂,   dL/dx = r·(g - x̂·mean(g·x̂)).
    """

    @staticmethod
    def forward(ctx, x, weight, eps):  # x (..., dim), weight (dim,)
        xf = x.float()
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)  # (..., 1), fp32
        ctx.save_for_backward(x, rstd, weight)
        return (xf * rstd).type_as(x) * weight  # HF's LlamaRMSNorm, op for op: normalise in fp32, round, scale

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):  # (..., dim)
        x, rstd, weight = ctx.saved_tensors
        shape, dim = x.shape, x.shape[-1]
        # one row per token: (N, dim), (N, 1), (N, dim)
        x, rstd, grad_out = x.reshape(-1, dim), rstd.reshape(-1, 1), grad_out.reshape(-1, dim)
        grad_x = torch.empty_like(x) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros(dim, device=x.device) if ctx.needs_input_grad[1] else None  # summed in fp32
        for rows in (slice(s, s + CHUNK_SIZE) for s in range(0, len(x), CHUNK_SIZE)):
            xhat = x[rows].float() * rstd[rows]  # (n, dim) fp32: the forward's normalised x, recomputed
            if grad_w is not None:
                grad_w += (grad_out[rows] * xhat.type_as(x)).sum(0, dtype=torch.float32)
            if grad_x is not None:
                g = (grad_out[rows] * weight).type_as(x).float()  # the gradient at x̂, in x's dtype as autograd's
                grad_x[rows] = rstd[rows] * (g - xhat * (g * xhat).mean(-1, keepdim=True))
        return (grad_x.view(shape) if grad_x is not None else None,
                grad_w.to(weight.dtype) if grad_w is not None else None, None)


class RMSNorm(nn.Module):
    """x / rms(x) * weight. No mean subtraction and no bias, unlike LayerNorm; computed in fp32."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return RMSNormFunction.apply(x, self.weight, self.eps)


def rope_angles(positions: torch.Tensor, head_dim: int, theta: float, scaling: float = 1.0):
    """cos and sin of the rotation angles, each (T, head_dim/2), in fp32.

    Pair i of a head (dimensions 2i and 2i+1) turns at frequency theta^(-2i/head_dim). Linear position
    interpolation divides the positions by `scaling`, so every angle stays within what the model saw
    during pre-training.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim))
    angles = torch.outer(positions.float() / scaling, inv_freq)  # (T, head_dim/2)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each pair (x[2i], x[2i+1]) of x (B, T, H, D) by its angle. Real arithmetic, Meta's layout.

    This is Meta's complex multiplication (x0 + i*x1) * (cos + i*sin) written with real numbers, which
    keeps the model free of complex tensors (they break some collectives and exporters).
    """
    if x.size(1) > CHUNK_SIZE:
        # Its fp32 temporaries take 6 times the bytes of a bf16 x, in forward and in backward: for a long sequence,
        # rotate CHUNK_SIZE tokens at a time (each token's rotation is its own, so the result is the same)
        pieces = zip(x.split(CHUNK_SIZE, dim=1), cos.split(CHUNK_SIZE), sin.split(CHUNK_SIZE))
        return torch.cat([apply_rope(*p) for p in pieces], dim=1)
    xf = x.float().unflatten(-1, (-1, 2))  # (B, T, H, D/2, 2)
    x0, x1 = xf[..., 0], xf[..., 1]  # (B, T, H, D/2)
    cos, sin = cos[:, None, :], sin[:, None, :]  # (T, 1, D/2): broadcast over batch and heads
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)  # (B, T, H, D/2, 2)
    return out.flatten(-2).type_as(x)


def rope_rotate(args: ModelArgs, positions: torch.Tensor):
    """rotate(x, p): RoPE of x (B, T, H, D) by positions p, for one forward pass.

    The cos and sin of `positions` (the forward's own) are computed here, once, and every layer reuses
    them, instead of recomputing the same angles for q and for k in every layer: a decoding step is a
    few hundred small kernels, and those were a fifth of them. Other positions (the sink cache rotates
    by index in the cache) are computed on demand.
    """
    cos, sin = rope_angles(positions, args.head_dim, args.rope_theta, args.rope_scaling)  # (T, D/2) each

    def rotate(x, p):
        if p is positions:
            return apply_rope(x, cos, sin)
        return apply_rope(x, *rope_angles(p, args.head_dim, args.rope_theta, args.rope_scaling))

    return rotate


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__()
        self.args = args  # shared with the model, so switching args.attn switches every layer
        self.layer_id = layer_id
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
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
            # to rotate them, see sample.py's sink cache), so it receives q and k before RoPE.
            y = cache.attend(self.layer_id, q, k, v, positions, rotate)
        else:
            q, k = rotate(q, positions), rotate(k, positions)
            a = self.args
            y = attention(q, k, v, mode=a.attn, group_size=a.group_size, sink_tokens=a.sink_tokens,
                          wrap=a.shift_wrap, lengths=lengths)  # (B, T, H, D)
        return self.wo(y.reshape(B, T, self.n_heads * self.head_dim))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x), run over mini-sequences of `chunk_size` tokens.

    Each token's output depends on that token alone, so the sequence can be cut into chunks. At long context
    the (T, hidden_dim) intermediates are the largest tensors of a block that activation checkpointing
    recomputes in backward. Checkpointing each chunk keeps only the chunk's input for backward, so those
    intermediates exist for one chunk at a time, in forward and in backward; the price is one more forward
    of the feed-forward. This is the Mini-Sequence Transformer's (2024) MLP, exact up to float rounding.

    `norm`, the block's ffn_norm, runs inside each chunk too: then the normalised sequence never exists whole,
    and the chunks keep slices of x, which the block's residual connection has made anyway.
    """

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)  # gate
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)  # down
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)  # up
        self.chunk_size = CHUNK_SIZE  # 0 = the whole sequence at once

    def swiglu(self, x, norm=None):
        if norm is not None:
            x = norm(x)
        return self.w2(F.silu(self.w1(x)) * self.w3(x))

    def forward(self, x, norm=None):  # (B, T, dim)
        if not self.chunk_size or x.size(1) <= self.chunk_size:
            return self.swiglu(x, norm)
        chunks = x.split(self.chunk_size, dim=1)  # (B, chunk_size, dim) each; the last may be shorter
        return torch.cat([torch.utils.checkpoint.checkpoint(self.swiglu, c, norm, use_reentrant=False) for c in chunks],
                         dim=1)


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__()
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = Attention(args, layer_id)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = FeedForward(args.dim, args.hidden_dim)

    def forward(self, x, positions, lengths=None, cache=None, rotate=None):
        h = x + self.attention(self.attention_norm(x), positions, lengths, cache, rotate)
        return h + self.feed_forward(h, self.ffn_norm)  # ffn_norm is applied chunk by chunk


# ----------------------------------------------------------------------------------------------------
# KV cache for generation


class KVCache:
    """Preallocated keys and values of every layer, written at [pos : pos+T] as in Meta's reference.

    A cache decides what the new queries attend to. This one keeps everything, so decoding token by
    token gives the same logits as one full forward. sample.py adds caches that evict tokens (H₂O,
    attention sinks) with the same `attend` method.
    """

    def __init__(self, args: ModelArgs, batch_size: int, max_len: int, device=None, dtype=torch.float32):
        shape = (batch_size, max_len, args.n_kv_heads, args.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(args.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(args.n_layers)]
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
        self.gradient_checkpointing = False  # recompute each block in backward (train.py turns it on)
        self.offload_activations = False  # with checkpointing: keep the blocks' inputs in host memory
        self.chunk_size = CHUNK_SIZE  # tokens per chunk of the loss
        self.tokenizer = None  # set by from_pretrained when a tokenizer.model sits next to the weights
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
        B, T = tokens.shape
        start = cache.pos if cache is not None else 0
        positions = torch.arange(start, start + T, device=tokens.device)
        rotate = rope_rotate(self.args, positions)  # cos/sin once for all layers
        if torch.is_tensor(lengths):
            # read to the host once here, not in every layer (each read waits for the device); attention.py
            # builds its masks and packed indices from these ints once and reuses them in every layer
            lengths = tuple(lengths.tolist())
        h = self.tok_embeddings(tokens)  # (B, T, dim)
        if torch.is_autocast_enabled(h.device.type):  # the residual stream in the compute dtype, as under FSDP's bf16
            h = h.to(torch.get_autocast_dtype(h.device.type))
        checkpointing = self.gradient_checkpointing and self.training
        # Offloading: what checkpointing saves of each block, its input, waits for backward in (pinned) host memory.
        offload = checkpointing and self.offload_activations and torch.is_grad_enabled()
        with torch.autograd.graph.save_on_cpu(pin_memory=h.is_cuda) if offload else contextlib.nullcontext():
            for layer in self.layers:
                if checkpointing:
                    # only h is a saved input: offloading would copy `positions`, and rotate knows the forward's own
                    # positions by identity (its cos/sin are computed once)
                    h = torch.utils.checkpoint.checkpoint(lambda x, layer=layer: layer(x, positions, lengths, None, rotate),
                                                          h, use_reentrant=False)
                else:
                    h = layer(h, positions, lengths, cache, rotate)
        if cache is not None:
            cache.pos += T
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        if targets is None:
            return self.output(self.norm(h))  # (B, T, vocab_size)
        # The loss, chunk by chunk. Whole, the fp32 logits with their log-softmax and gradient take 12 bytes
        # per vocabulary entry and token, the largest tensors of a long-context step (12.6 GB for LLaMA2's
        # 32000 entries at 32k tokens). Each chunk's final norm, projection and log-softmax run inside a
        # checkpoint, recomputed in backward, so at any time only one chunk's logits exist, and besides the last
        # block's output h no normalised copy of the whole sequence is ever kept.
        def chunk_loss(h, y):  # (n, dim), (n,) -> the sum of the n tokens' losses, fp32
            return F.cross_entropy(self.output(self.norm(h)).float(), y, ignore_index=-100, reduction="sum")

        h, targets = h.flatten(0, 1), targets.flatten()  # (B*T, dim), (B*T,)
        loss = sum(torch.utils.checkpoint.checkpoint(chunk_loss, hc, yc, use_reentrant=False)
                   for hc, yc in zip(h.split(self.chunk_size), targets.split(self.chunk_size)))
        # "sum" lets a caller divide by the target count of a whole batch (gradient accumulation, several ranks)
        return loss if reduction == "sum" else loss / (targets != -100).sum()

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())  # tied weights are counted once

    # ------------------------------------------------------------------------------------------------
    # Loading and saving

    @classmethod
    def from_pretrained(cls, path, dtype=None, device=None, **overrides) -> "Transformer":
        """Load Meta (`params.json` + `consolidated.NN.pth`), HF (`config.json` + `*.safetensors`) or
        this project's layout (`params.json` + `model.safetensors`). Strict: a missing, unexpected or
        mis-shaped tensor raises CheckpointError naming it. `overrides` replace ModelArgs fields.

        The model is built on the meta device and the checkpoint's tensors are assigned into it one block at
        a time (read from the memory-mapped files, converted to dtype/device as they arrive), so loading needs
        about one copy of the weights in RAM, not two.
        """
        from weights import read_checkpoint  # weights.py reads the files and builds on this file's ModelArgs

        args, weights = read_checkpoint(path)
        args = ModelArgs(**{**asdict(args), **overrides})
        with torch.device("meta"):
            model = cls(args)
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        if args.tie_embeddings:
            expected.pop("output.weight")
        check_state_dict(weights.specs, expected, path)
        state = {}
        for _, names in itertools.groupby(weights.specs, key=lambda k: k.split(".")[:2]):  # ["layers", "0"], ...
            state.update({k: v.to(device=device, dtype=dtype if v.is_floating_point() and dtype else v.dtype)
                          for k, v in weights.read(list(names)).items()})
        if args.tie_embeddings:
            state["output.weight"] = state["tok_embeddings.weight"]
        model.load_state_dict(state, strict=True, assign=True)
        if args.tie_embeddings:  # assign=True replaced the shared parameter: tie it again
            model.output.weight = model.tok_embeddings.weight
        tok = find_tokenizer(path)
        model.tokenizer = Tokenizer(tok) if tok else None
        if tok:
            check_tokenizer_fits(model.tokenizer, args.vocab_size)
        return model

    def save_pretrained(self, out_dir, tokenizer_path=None):
        """This project's layout: Meta's names and a params.json, the tensors in one safetensors file."""
        from safetensors.torch import save_file

        os.makedirs(out_dir, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        if self.args.tie_embeddings:
            state.pop("output.weight")
        atomic_write(os.path.join(out_dir, "model.safetensors"), lambda f: save_file(state, f, metadata={"format": "pt"}))
        params = json.dumps(asdict(self.args), indent=2)
        write_text(os.path.join(out_dir, "params.json"), params)
        if tokenizer_path:
            data = open(tokenizer_path, "rb").read()
            atomic_write(os.path.join(out_dir, "tokenizer.model"), lambda f: open(f, "wb").write(data))


# ----------------------------------------------------------------------------------------------------
# Checkpoint formats


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message is one line that names the problem."""


def check_tokenizer_fits(tokenizer, vocab_size):
    """Its ids must index the embedding, which may hold a few padding rows more, not thousands."""
    if not vocab_size - 256 <= tokenizer.vocab_size <= vocab_size:
        raise CheckpointError(f"{tokenizer.path}: a {tokenizer.vocab_size}-token tokenizer does not fit the model's "
                              f"{vocab_size}-token embedding (another model's tokenizer?)")


def atomic_write(path, write_fn):
    """Call write_fn(tmp_path), then rename over `path`: a killed run never leaves a half-written file."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        write_fn(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text(path, text: str):
    """Write a UTF-8 text file atomically (see atomic_write)."""
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write(path, write)


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


def _read_json(path):
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


def hf_config_to_args(cfg, where="config.json") -> ModelArgs:
    """ModelArgs from an HF LlamaConfig dict (config.json).

    The context under linear RoPE scaling. transformers reads none off these fields for linear scaling (the
    factor only divides the positions), so two conventions are in use, told apart by one field:
      * `original_max_position_embeddings` present (this project's exports; transformers' meaning for YaRN):
        it is the pre-training context, and `max_position_embeddings` the extended one;
      * absent (LongLoRA's fine-tune.py keeps `max_position_embeddings` and adds the factor, so its released
        -ft 32k models say 4096 + linear 8; transformers' default for YaRN too): `max_position_embeddings` is
        the pre-training context and the context is max_position_embeddings x factor. fine-tune.py reads a
        config back the same way since Nov 2023 (its orig_ctx_len = max_position_embeddings x factor).
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
    return ModelArgs(
        dim=cfg["hidden_size"], n_layers=cfg["num_hidden_layers"], n_heads=n_heads,
        n_kv_heads=cfg.get("num_key_value_heads") or n_heads, vocab_size=cfg["vocab_size"],
        ffn_hidden_dim=cfg["intermediate_size"], norm_eps=cfg.get("rms_norm_eps", 1e-6),
        rope_theta=rope.get("rope_theta", cfg.get("rope_theta", 10000.0)), rope_scaling=factor,
        max_seq_len=max_pos if original else round(max_pos * factor), original_max_seq_len=original or max_pos,
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
    )


# ----------------------------------------------------------------------------------------------------
# Tokenizer


class Tokenizer:
    """LLaMA's sentencepiece tokenizer: encode(text) -> ids with BOS, decode(ids) -> text."""

    def __init__(self, model_path: str):
        import sentencepiece as spm

        if not os.path.isfile(model_path):
            raise FileNotFoundError(f"{model_path}: no such tokenizer file")
        try:
            self.sp = spm.SentencePieceProcessor(model_file=model_path)
        except (RuntimeError, OSError) as e:  # sentencepiece raises RuntimeError("Internal: ...") on a foreign file
            raise ValueError(f"{model_path}: not a sentencepiece tokenizer model ({one_line(e)})") from None
        self.path = model_path
        self.vocab_size = self.sp.vocab_size()
        self.bos_id, self.eos_id, self.pad_id = self.sp.bos_id(), self.sp.eos_id(), self.sp.pad_id()

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list:
        return [self.bos_id] * bos + self.sp.encode(text) + [self.eos_id] * eos

    def decode(self, ids) -> str:
        return self.sp.decode(list(ids))


def find_tokenizer(path) -> Optional[str]:
    """tokenizer.model next to the weights, or in the parent folder (Meta's download puts it there)."""
    for cand in (os.path.join(path, "tokenizer.model"), os.path.join(os.path.dirname(os.path.abspath(path)), "tokenizer.model")):
        if os.path.isfile(cand):
            return cand
    return None


# ----------------------------------------------------------------------------------------------------
# A small CLI: inspect a checkpoint, or smoke-test a preset with random weights.


@entry
def main(argv=None):
    p = Parser(description="Load a LLaMA2 checkpoint (or build a preset) and run one forward pass.", examples=[
        "python model.py --preset tiny", "python model.py --model /path/to/llama-2-7b-hf --prompt 'The capital of France is'"])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="checkpoint directory: Meta, HF or this project's layout")
    src.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="random-weight model of a named shape")
    p.add_argument("--prompt", default="Hello", help="text to run through the model (needs a tokenizer.model for --model)")
    p.add_argument("--seed", type=int, default=0, help="seed for the random preset weights and tokens")
    a = p.parse_args(argv)
    torch.manual_seed(a.seed)
    # A preset of billions of parameters is only described: built on the meta device, it holds no memory.
    big = not a.model and PRESETS[a.preset]["dim"] >= 4096
    with torch.device("meta" if big else "cpu"):
        model = Transformer.from_pretrained(a.model) if a.model else Transformer(preset(a.preset))
    args = model.args
    print(f"model: {a.model or a.preset}: {model.num_params() / 1e6:.2f}M parameters, dim {args.dim}, "
          f"{args.n_layers} layers, {args.n_heads} heads ({args.n_kv_heads} kv), ffn {args.hidden_dim}, "
          f"vocab {args.vocab_size}, rope theta {args.rope_theta:g} scaling {args.rope_scaling:g}, context {args.max_seq_len} "
          f"(pre-training {args.original_max_seq_len})" + ("; built on the meta device: no weights, no forward pass" if big else ""))
    if big:
        return 0
    if model.tokenizer is not None:
        ids = model.tokenizer.encode(a.prompt)
    else:  # no tokenizer: random token ids stand in for the prompt
        ids = torch.randint(0, args.vocab_size, (8,)).tolist()
    with torch.no_grad():
        logits = model(torch.tensor([ids]))
    top = logits[0, -1].float().softmax(-1).topk(5)
    show = (lambda i: repr(model.tokenizer.decode([i]))) if model.tokenizer else str
    print(f"{len(ids)} prompt tokens -> logits {tuple(logits.shape)}; next-token top 5: " +
          ", ".join(f"{show(i)} {p:.3f}" for p, i in zip(top.values.tolist(), top.indices.tolist())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
