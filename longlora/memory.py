"""
Memory-lean training: the model's forward with the same numbers and far less kept for backward.

model.py is the plain LLaMA2; `model.lean = True` (train.py sets it) routes its forward through here. At long
context the activations, not the weights, fill a GPU: per token and layer the plain forward keeps every
intermediate of the norms, the feed-forward and the loss for backward. Here:

  * activation checkpointing: each block keeps only its input and is recomputed in backward
    (`model.gradient_checkpointing`); with `model.offload_activations` those inputs wait in (pinned) host memory;
  * RMSNorm with a hand-written backward that keeps only x and the fp32 rsqrt (RMSNormFunction);
  * RoPE, the feed-forward and the loss CHUNK_SIZE tokens at a time: their fp32 and (T, hidden) or (T, vocab)
    temporaries exist for one chunk at a time (the feed-forward's and the loss's chunks are checkpointed too).

Each token's result is its own in all three, so cutting the sequence changes nothing. Forwards are bit-equal to
the plain ones; gradients agree up to the order of float sums (tests/test_memory.py and tests/test_model.py check
both). longlora/estimate.py counts what each piece keeps.
"""

import contextlib

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# Tokens per chunk of RoPE, the feed-forward, the loss and the RMSNorm backward.
CHUNK_SIZE = 1024
FFN_CHUNK_SIZE = None  # the feed-forward's: None = CHUNK_SIZE; 0 = the whole sequence at once (faster, more memory)


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
        return (xf * rstd).type_as(x) * weight  # model.RMSNorm's formula, op for op

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


def rms_norm(x, norm):
    """norm(x) for a model.RMSNorm `norm`, through RMSNormFunction."""
    return RMSNormFunction.apply(x, norm.weight, norm.eps)


def rope_in_chunks(apply_rope):
    """model.apply_rope(x, cos, sin), CHUNK_SIZE tokens at a time: its fp32 temporaries take 6 times the bytes of a
    bf16 x, in forward and in backward."""

    def rotate(x, cos, sin):  # x (B, T, H, D), cos and sin (T, D/2)
        if x.size(1) <= CHUNK_SIZE:
            return apply_rope(x, cos, sin)
        pieces = zip(x.split(CHUNK_SIZE, dim=1), cos.split(CHUNK_SIZE), sin.split(CHUNK_SIZE))
        return torch.cat([apply_rope(*p) for p in pieces], dim=1)

    return rotate


def feed_forward_in_chunks(feed_forward, norm, h):
    """feed_forward(norm(h)) over mini-sequences of CHUNK_SIZE tokens, each checkpointed.

    At long context the (T, hidden_dim) intermediates of SwiGLU are the largest tensors of a block that
    checkpointing recomputes in backward. Checkpointing each chunk keeps only the chunk's input, so they exist
    for one chunk at a time, in forward and in backward; the price is one more forward of the feed-forward.
    This is the Mini-Sequence Transformer's (2024) MLP. The norm runs inside each chunk too, so the normalised
    sequence never exists whole, and the chunks keep slices of h, which the residual stream holds anyway.
    """
    def swiglu(c):  # (B, n, dim) -> (B, n, dim)
        return feed_forward(rms_norm(c, norm))

    chunk = CHUNK_SIZE if FFN_CHUNK_SIZE is None else FFN_CHUNK_SIZE
    if not chunk or h.size(1) <= chunk:
        return swiglu(h)
    return torch.cat([checkpoint(swiglu, c, use_reentrant=False) for c in h.split(chunk, dim=1)], dim=1)


def lean_block(block, x, positions, lengths, rotate):
    """model.TransformerBlock.forward with the norms and the feed-forward above (called from inside it, so that
    FSDP's hooks on the block run as usual)."""
    h = x + block.attention(rms_norm(x, block.attention_norm), positions, lengths, None, rotate)
    return h + feed_forward_in_chunks(block.feed_forward, block.ffn_norm, h)


def loss_in_chunks(norm, output, h, targets):
    """The summed cross-entropy (fp32) of output(norm(h)) against targets (-100: ignored), CHUNK_SIZE tokens at a time.

    Whole, the fp32 logits with their log-softmax and gradient take 12 bytes per vocabulary entry and token, the
    largest tensors of a long-context step (12.6 GB for LLaMA2's 32000 entries at 32k tokens). Each chunk's final
    norm, projection and log-softmax run inside a checkpoint, recomputed in backward, so only one chunk's logits
    ever exist, and besides h no normalised copy of the whole sequence is kept.
    """
    def chunk_loss(hc, yc):  # (n, dim), (n,) -> the sum of the n tokens' losses
        return F.cross_entropy(output(rms_norm(hc, norm)).float(), yc, ignore_index=-100, reduction="sum")

    h, targets = h.flatten(0, 1), targets.flatten()  # (B*T, dim), (B*T,)
    return sum(checkpoint(chunk_loss, hc, yc, use_reentrant=False)
               for hc, yc in zip(h.split(CHUNK_SIZE), targets.split(CHUNK_SIZE)))


def lean_layers(model, h, positions, lengths, rotate):
    """The blocks of model.Transformer.forward for training: each checkpointed (its input offloaded if asked), with
    lean_block inside. h (B, T, dim) -> (B, T, dim)."""
    checkpointing = model.gradient_checkpointing and model.training
    # Offloading: what checkpointing saves of each block, its input, waits for backward in (pinned) host memory.
    offload = checkpointing and model.offload_activations and torch.is_grad_enabled()
    with torch.autograd.graph.save_on_cpu(pin_memory=h.is_cuda) if offload else contextlib.nullcontext():
        for layer in model.layers:
            if checkpointing:
                # only h is a saved input: offloading would copy `positions`, and rotate knows the forward's own
                # positions by identity (its cos/sin are computed once)
                h = checkpoint(lambda x, layer=layer: layer(x, positions, lengths, None, rotate, lean=True),
                               h, use_reentrant=False)
            else:
                h = layer(h, positions, lengths, None, rotate, lean=True)
    return h
