"""
Memory per GPU and FLOPs per optimizer step of a training run, from the shapes alone (no weights are
loaded): what to check before renting GPUs.

    python train.py --estimate --preset llama2-7b --ctx 32768 --gpus 8     # or --model DIR (its config only)
    python estimate.py --preset llama2-7b --ctx 32768 --gpus 8             # the same: train.py's flags and checks

The run it describes is train.py's: bf16 compute under FSDP2 over --gpus GPUs, LoRA+ (or --full, --from-scratch),
--attn, --batch-size x --grad-accum sequences of --ctx tokens per GPU and step. Memory, in bytes per GPU:

  * sharded state: the frozen bf16 base, plus the fp32 trainable weights, their gradients and AdamW's two
    moments, each split evenly across the GPUs;
  * FSDP gathered: the block that computes plus the one prefetched, all-gathered in bf16, the root's
    embedding and output matrices (gathered from forward to backward), and one block's gradients before
    they are reduce-scattered;
  * unsharded gradients: with gradient accumulation and LoRA, FSDP reduces only after the last micro-batch,
    so until then each GPU keeps every trainable tensor's whole gradient in fp32 (full fine-tuning reduces
    every micro-batch instead: a whole fp32 gradient of every parameter would cost more than it saves);
  * activations: counted from the tensors autograd keeps for model.py (layer_activation_bytes; a test
    checks it against autograd's saved tensors). With checkpointing, each block's input (2·dim bytes per
    token and layer, bf16) plus the larger of one recomputed block (its activations, the gradients in flight
    through it, one feed-forward chunk's widest tensors) and the loss (12 bytes per vocabulary entry for one
    chunk of model.CHUNK_SIZE tokens: the fp32 log-softmax, its gradient and the logits' gradient alive
    together). With --offload-activations the blocks' inputs move to the host's pinned memory, reported
    separately (per GPU and for all GPUs: the host of 8 GPUs holds 8 times that).

FLOPs count a multiply-add as 2, backward as twice the forward, plus the forward recomputed by
checkpointing (the chunked feed-forward's twice, the loss chunks' output projection once); attention counts the (query, key) pairs each pattern lets a head compute (visible_pairs; a
test checks it against attention.py's masks). Left out, as in any estimate of tensor bytes: the CUDA
context and library workspaces, communication buckets, and the caching allocator's fragmentation.
"""

import json
import os
import sys

from attention import resolve_group_size
from lora import DEFAULT_TARGETS
from model import CHUNK_SIZE, CheckpointError, ModelArgs, hf_config_to_args, preset


def param_counts(m: ModelArgs, lora_r, targets, embed, norms, full):
    """Parameter counts: total base, trainable, LoRA, one block (incl. LoRA), root (embeddings + output + norm)."""
    d, kv, F_, V, L = m.dim, m.n_kv_heads * m.head_dim, m.hidden_dim, m.vocab_size, m.n_layers
    shapes = {"wq": (d, d), "wk": (d, kv), "wv": (d, kv), "wo": (d, d), "w1": (d, F_), "w2": (F_, d), "w3": (d, F_)}
    block = sum(i * o for i, o in shapes.values()) + 2 * d  # seven matrices and two RMSNorm weights
    root = V * d * (1 if m.tie_embeddings else 2) + d
    total = L * block + root
    if full:
        return dict(total=total, trainable=total, lora=0, block=block, root=root, matmul=L * (block - 2 * d) + V * d)
    lora_block = sum(lora_r * (i + o) for t, (i, o) in shapes.items() if t in targets)
    lora = L * lora_block + (lora_r * (d + V) if "output" in targets else 0)
    trainable = lora + (V * d if embed else 0) + ((2 * L + 1) * d if norms else 0)
    return dict(total=total, trainable=trainable, lora=lora, block=block + lora_block, root=root,
                matmul=L * (block - 2 * d) + V * d)


def visible_pairs(mode, T, g, sinks):
    """(query, key) pairs one head computes, averaged over the heads: causal full attention T(T+1)/2; S²
    with groups of g: half the heads see their own group, the other half groups shifted by g/2 (first and
    last half-sized); SF also shows the first `sinks` keys to every query in a later group."""
    tri = lambda n: n * (n + 1) // 2
    if mode == "full":
        return tri(T)

    def pairs(starts):  # groups [start, next start), causal inside, plus the sink keys before the group
        bounds = list(starts) + [T]
        return sum(tri(e - s) + (e - s) * (min(sinks, s) if mode == "sf" else 0) for s, e in zip(bounds, bounds[1:]))

    plain = pairs(range(0, T, g))
    shifted = pairs([0] + list(range(g // 2, T, g)))
    return (plain + shifted) / 2


def layer_activation_bytes(m: ModelArgs, full=False, norms=True, lora_r=8, targets=DEFAULT_TARGETS, ffn_chunked=False):
    """Bytes per token that autograd keeps for one TransformerBlock of model.py computing in bf16 (what
    FSDP's bf16 mixed precision does), read off the backward graph. A frozen matmul keeps only its
    weight, not its input, which is why LoRA saves most of the activations of full fine-tuning.

      RMSNorm (x2)   the fp32 copy of x for the rsqrt 4d (and the rsqrt, 4), the bf16 normalised x for the norm weight's
                     gradient 2d (only if the norm trains)
      wq wk wv       their shared bf16 input 2d, kept for the LoRA A matrices (full fine-tuning: for the weights)
      LoRA           each target's A·x, r numbers: 2r per target
      RoPE           nothing per layer: its cos/sin are computed once per forward and shared by every layer
      attention      q, k, v and the output in bf16 (2d + 4kv + 2d; the output is also wo's input) and the
                     fp32 log-sum-exp per head 4H (FlashAttention and SDPA keep no T x T matrix)
      SwiGLU         w1·x (for silu), silu(w1·x) and w3·x (for their product): 3 x 2F; full fine-tuning
                     also keeps the frozen-in-LoRA inputs of w1/w3 (2d) and of w2 (2F). Run over checkpointed
                     chunks (ffn_chunked: the sequence is longer than model.CHUNK_SIZE), only the chunks' input,
                     the bf16 ffn_norm output 2d, is kept; the rest exists for one chunk at a time (estimate())
    """
    d, kv, F_, H = m.dim, m.n_kv_heads * m.head_dim, m.hidden_dim, m.n_heads
    norm = 4 * d + 4 + (2 * d if norms or full else 0)  # + the fp32 rsqrt, one number per token
    attn_inputs = 2 * d
    lora = 0 if full else 2 * lora_r * sum(t in targets for t in ("wq", "wk", "wv", "wo", "w1", "w2", "w3"))
    attn = 2 * d + 4 * kv + 2 * d + 4 * H
    ffn = 2 * d if ffn_chunked else 3 * 2 * F_ + (2 * d + 2 * F_ if full else 0)
    return 2 * norm + attn_inputs + lora + attn + ffn


def estimate(m: ModelArgs, ctx, attn, gpus, batch, accum, lora_r=8, targets=DEFAULT_TARGETS, embed=True,
             norms=True, full=False, group_size=None, sinks=4, chunk=CHUNK_SIZE, offload=False):
    """Per-GPU memory (bytes) and FLOPs per optimizer step of a bf16 FSDP run; see the comments for each term.
    chunk: model.CHUNK_SIZE, tokens per chunk of the loss and of the feed-forward; offload: --offload-activations."""
    c = param_counts(m, lora_r, targets, embed, norms, full)
    d, kv, F_, V, L, H, hd = m.dim, m.n_kv_heads * m.head_dim, m.hidden_dim, m.vocab_size, m.n_layers, m.n_heads, m.head_dim
    B, T, W = batch, ctx, gpus
    frozen = c["total"] - c["trainable"]
    mem = {}
    # Sharded state, split evenly across W GPUs by FSDP:
    mem["frozen weights (bf16)"] = 2 * frozen / W
    mem["trainable weights (fp32)"] = 4 * c["trainable"] / W
    mem["gradients (fp32)"] = 4 * c["trainable"] / W
    mem["AdamW state (2 x fp32)"] = 8 * c["trainable"] / W
    # FSDP's working set: the block that computes plus the one prefetched, all-gathered in bf16, the root's
    # tensors (embeddings, output) which stay gathered from forward to backward, and one block's gradients
    # before they are reduce-scattered.
    block_grads = 2 * (c["block"] if full else c["trainable"] / L)
    mem["FSDP gathered weights (bf16)"] = 2 * (2 * c["block"] + c["root"]) + block_grads
    # Gradient accumulation: FSDP reduce-scatters the gradients after the last micro-batch only
    # (set_requires_gradient_sync), so until then every trainable tensor keeps an unsharded gradient, in fp32
    # (FSDP2 accumulates in the reduce dtype). Full fine-tuning reduces every micro-batch (see train.py).
    mem["unsharded gradients (fp32)"] = 4 * c["trainable"] if accum > 1 and W > 1 and not full else 0
    ffn_chunked = T > chunk
    per_layer = layer_activation_bytes(m, full, norms, lora_r, targets, ffn_chunked)  # per token, see there
    # The loss, over chunks of `chunk` tokens of the flattened batch: one chunk's logits exist at a time, at
    # most 12 bytes per vocabulary entry and token (backward: the recomputed fp32 log-softmax, its gradient
    # and the logits' gradient alive together); besides, the final norm's bf16 output (the chunks' input) and
    # its gradient, gathered from the chunks, for every token: 2 x 2d.
    loss_peak = 12 * V * min(chunk, B * T) + 2 * 2 * d * B * T
    final_norm = (6 if norms or full else 4) * d * B * T  # the last RMSNorm, as in a block
    # One block recomputed in backward: its activations, plus the gradients in flight through it for every
    # token: the gradient arriving at its output and the one leaving at its input (2 x 2d, bf16), attention's
    # dq, dk, dv and output gradient (2d + 4kv + 2d) and FlashAttention-2's fp32 dq accumulator (4d); plus
    # the feed-forward's widest tensors for one chunk (B x chunk tokens; the whole sequence when not chunked):
    # the gradients through its two F-wide products (2 x 2F) and, when chunked, the chunk's own recomputed
    # w1·x, silu(w1·x) and w3·x (3 x 2F; unchunked they are part of per_layer).
    in_flight = 2 * 2 * d + (2 * d + 4 * kv + 2 * d) + 4 * d
    ffn_tokens = B * min(chunk, T)
    block_peak = (per_layer + in_flight) * B * T + (2 * 2 * F_ + (3 * 2 * F_ if ffn_chunked else 0)) * ffn_tokens
    # With checkpointing only each block's input survives the forward (2d per token and layer, bf16: the
    # embedding output is cast to the compute dtype), and the peak adds the larger of the loss and one
    # recomputed block. Offloaded (--offload-activations), those inputs wait in the host's pinned memory and
    # the GPU holds the one block's input that its recompute has brought back.
    saved_inputs = L * 2 * d * B * T
    mem["activations, checkpointing"] = ((2 * d * B * T if offload else saved_inputs) + final_norm
                                         + max(loss_peak, block_peak))
    mem["activations, no checkpointing"] = L * per_layer * B * T + final_norm + loss_peak  # the FFN chunks regardless
    static = sum(v for k, v in mem.items() if not k.startswith("activations"))
    # FLOPs per optimizer step, all GPUs together (a multiply-add counts 2):
    tokens = B * T * accum * W
    g = resolve_group_size(attn, T, group_size) if attn != "full" else None
    pairs = visible_pairs(attn, T, g, sinks)
    attn_fwd = L * H * 4 * hd * pairs * B  # per sequence: q·k and p·v for every visible pair, every head and layer
    # Backward is twice the forward; checkpointing reruns the forward once more (FlashAttention's own
    # recompute of the scores in backward is not counted, as usual for model FLOPs).
    passes = 3 + 1
    attn_flops = attn_fwd * passes * accum * W
    # Dense: 2 FLOPs per matmul weight per token forward; backward needs input gradients everywhere (2 per
    # weight) but weight gradients only for what trains; checkpointing recomputes the blocks' forward.
    blocks_matmul = c["matmul"] - V * d
    lora_matmul = c["lora"]
    fwd = 2 * (c["matmul"] + lora_matmul)
    bwd = 2 * (c["matmul"] + lora_matmul) + 2 * (c["matmul"] if full else lora_matmul)
    # The chunked feed-forward runs its forward once more inside the recomputed block, and each loss chunk its
    # output projection once more in backward.
    recompute = 2 * (blocks_matmul + lora_matmul) + (2 * L * 3 * d * F_ if ffn_chunked else 0) + 2 * V * d
    dense_flops = (fwd + bwd + recompute) * tokens
    return dict(params=c, memory=mem, static=static, tokens=tokens, group=g, attn_flops=attn_flops,
                host=saved_inputs if offload else 0,
                dense_flops=dense_flops, total_ckpt=static + mem["activations, checkpointing"],
                total_no_ckpt=static + mem["activations, no checkpointing"])


def human(n):
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}k"


def format_estimate(e, name, ctx, attn, gpus, batch, accum, full):
    GB, c = 1e9, e["params"]
    lines = [f"estimate: {name}, ctx {ctx}, attn {attn}" + (f" (groups of {e['group']})" if e["group"] else "") +
             f", {gpus} GPU(s), batch {batch} x accumulation {accum} = {e['tokens']:,} tokens per step, bf16, FSDP",
             f"parameters: {human(c['total'])}, trainable {human(c['trainable'])}"
             + (" (full fine-tuning)" if full else f" (LoRA {human(c['lora'])} + embeddings/norms)"),
             "per-GPU memory (GB):"]
    for k, v in e["memory"].items():
        lines.append(f"  {k:<34} {v / GB:8.2f}")
    lines.append(f"  {'total with checkpointing':<34} {e['total_ckpt'] / GB:8.2f}")
    lines.append(f"  {'total without checkpointing':<34} {e['total_no_ckpt'] / GB:8.2f}")
    if e["host"]:
        lines.append(f"host memory per GPU (pinned, offloaded block inputs): {e['host'] / GB:.2f} GB ({e['host'] * gpus / GB:.1f} GB "
                     f"for {gpus} GPU(s))")
    total = e["attn_flops"] + e["dense_flops"]
    lines.append(f"FLOPs per step (all GPUs): attention {e['attn_flops'] / 1e15:.1f} PFLOP, dense {e['dense_flops'] / 1e15:.1f} "
                 f"PFLOP, total {total / 1e15:.1f} PFLOP ({total / gpus / 1e15:.1f} per GPU; attention "
                 f"{100 * e['attn_flops'] / total:.0f}%)")
    return "\n".join(lines)


def config_args(path):
    """ModelArgs of a checkpoint directory from its config alone (no weights are read)."""
    for name in ("config.json", "params.json"):
        p = os.path.join(path, name)
        if os.path.isfile(p):
            with open(p) as f:
                cfg = json.load(f)
            if name == "config.json":
                return hf_config_to_args(cfg, p)
            if cfg.get("vocab_size", -1) <= 0:  # Meta's params.json: -1 means "the tokenizer's", 32000 for LLaMA2
                cfg["vocab_size"] = 32000
            known = {"dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "ffn_dim_multiplier",
                     "ffn_hidden_dim", "norm_eps", "rope_theta", "rope_scaling", "max_seq_len", "tie_embeddings"}
            return ModelArgs(**{k: v for k, v in cfg.items() if k in known})
    raise CheckpointError(f"--model {path}: no config.json or params.json")


def run_estimate(a):
    """Print the estimate for train.py's parsed and checked arguments `a`."""
    if a.model:
        m, name = config_args(a.model), a.model
    else:
        name = a.preset or a.from_scratch or "llama2-7b"
        m = preset(name)
    e = estimate(m, a.ctx, a.attn, a.gpus, a.batch_size, a.grad_accum, a.lora_r, a.lora_targets,
                 not a.no_train_embed, not a.no_train_norms, full=bool(a.from_scratch or a.full), group_size=a.group_size,
                 sinks=a.sink_tokens, offload=a.offload_activations)
    print(format_estimate(e, name, a.ctx, a.attn, a.gpus, a.batch_size, a.grad_accum, bool(a.from_scratch or a.full)))
    return 0


def main(argv=None) -> int:
    """`python estimate.py FLAGS` is `python train.py --estimate FLAGS`: the same flags, checks and output."""
    import train  # train.py imports this file; importing it here, when called, avoids the cycle

    return train.main(["--estimate", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
