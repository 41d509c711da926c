"""
Memory per GPU and FLOPs per optimizer step of a training run, from the shapes alone (no weights are
loaded): what to check before renting GPUs.

    python train.py --estimate --preset llama2-7b --ctx 32768 --gpus 8     # or --model DIR (its config only)

The run it describes is train.py's: bf16 compute under FSDP2 over --gpus GPUs, LoRA+ (or --full, --from-scratch),
--attn, --batch-size x --grad-accum sequences of --ctx tokens per GPU and step. Memory, in bytes per GPU:

  * sharded state: the frozen bf16 base, plus the fp32 trainable weights, their gradients and AdamW's two
    moments, each split evenly across the GPUs;
  * FSDP gathered: the block that computes plus the one prefetched, all-gathered in bf16, and one block's
    gradients before they are reduce-scattered (the embedding and output matrices are gathered only around their
    own forward and backward, not while the blocks run backward);
  * unsharded gradients: with gradient accumulation and LoRA, FSDP reduces only after the last micro-batch,
    so until then each GPU keeps every trainable tensor's whole gradient in fp32 (full fine-tuning reduces
    every micro-batch instead: a whole fp32 gradient of every parameter would cost more than it saves);
  * reduce-scatter staging (full fine-tuning): FSDP2 reduces a unit's gradients in fp32, through a flat buffer of
    the whole unit's size and one of its 1/W share;
  * activations: counted from the tensors autograd keeps for model.py with model.lean (layer_activations; a test checks it
    against autograd's saved tensors), along the timeline of backward (activation_peak; a test checks it against
    the measured peak of a step on the CPU). With checkpointing, each block's input (2·dim bytes per token and
    layer, bf16) plus the larger of the loss's backward, which comes first (one chunk of memory.CHUNK_SIZE
    tokens' logits, 12 bytes per vocabulary entry and token, and the last block's output and its gradient) and
    one block's backward at its widest (the recomputed block's saved tensors and the gradients in flight).
    With --offload-activations the blocks' inputs move to the host's pinned memory, reported separately (per
    GPU and for all GPUs: the host of 8 GPUs holds 8 times that).

Host memory of a checkpoint save, per GPU (longlora/checkpoint.py): LoRA's rank 0 gathers the fp32 trainable
tensors and AdamW's two moments whole; full fine-tuning's ranks each write their own shards (DCP), one tensor shard
at a time.

FLOPs count a multiply-add as 2, backward as twice the forward, plus the forward recomputed by
checkpointing (the chunked feed-forward's twice, the loss chunks' output projection once); attention counts the (query, key) pairs each pattern lets a head compute (visible_pairs; a
test checks it against attention.py's masks). Left out, as in any estimate of tensor bytes: the CUDA
context and library workspaces (but FlashAttention-2's backward scratch is counted: flash_workspace),
communication buckets, and the caching allocator's fragmentation.
"""

import json
import os

from attention import resolve_group_size
from lora import DEFAULT_TARGETS
from longlora.memory import CHUNK_SIZE
from longlora.weights import CheckpointError, hf_config_fields
from model import ModelArgs, preset


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


def visible_pairs(mode, T, g, sinks, heads=2):
    """(query, key) pairs one head computes, averaged over the heads: causal full attention T(T+1)/2; S²
    with groups of g: heads//2 heads see their own group, the others groups shifted by g/2 (first and
    last half-sized); SF also shows the first `sinks` keys to every query in a later group."""
    tri = lambda n: n * (n + 1) // 2
    if mode == "full":
        return tri(T)

    def pairs(starts):  # groups [start, next start), causal inside, plus the sink keys before the group
        bounds = list(starts) + [T]
        return sum(tri(e - s) + (e - s) * (min(sinks, s) if mode == "sf" else 0) for s, e in zip(bounds, bounds[1:]))

    plain = pairs(range(0, T, g))
    shifted = pairs([0] + list(range(g // 2, T, g)))
    return (plain * (heads // 2) + shifted * (heads - heads // 2)) / heads


def layer_activations(m: ModelArgs, full=False, lora_r=8, targets=DEFAULT_TARGETS, ffn_chunked=False, flash=False):
    """Bytes per token that autograd keeps for one TransformerBlock of model.py computing in bf16 (what FSDP's
    bf16 mixed precision does), read off the backward graph, by part. A frozen matmul keeps only its weight,
    not its input, which is why LoRA saves most of the activations of full fine-tuning.

      input          the block's input x, kept by attention_norm 2d (with checkpointing: the very tensor the
                     checkpoint keeps; RMSNormFunction keeps its input and recomputes the rest)
      attention_norm its fp32 rsqrt, one number per token: 4
      qkv_input      wq wk wv's shared bf16 input 2d, kept for the LoRA A matrices (full fine-tuning: for the
                     weights), and each LoRA target's A·x, r numbers: 2r per target
      attention      q, k, v and the output in bf16 (2d + 4kv + 2d; the output is also wo's input), the fp32
                     log-sum-exp per head 4H (FlashAttention and SDPA keep no T x T matrix); RoPE keeps nothing
                     (its cos/sin are computed once per forward and shared by every layer, see activation_peak).
                     flash: attention.py's FlashAttention-2 path packs q, k, v for flash-attn, which keeps its
                     own packed output, and wo keeps the unpacked copy: 2d more
      ffn            chunked (the sequence is longer than memory.CHUNK_SIZE): the chunks' input, the residual
                     stream after attention 2d (ffn_norm runs inside each chunk, so nothing else of it is kept
                     whole; the rest exists for one chunk at a time, see activation_peak). Whole: ffn_norm's input and
                     rsqrt 2d + 4, w1·x (for silu), silu(w1·x) and w3·x (for their product) 3 x 2F; full
                     fine-tuning also keeps w1/w3's input (2d) and w2's (2F)
    """
    d, kv, F_, H = m.dim, m.n_kv_heads * m.head_dim, m.hidden_dim, m.n_heads
    lora = lambda names: 0 if full else 2 * lora_r * sum(t in targets for t in names)  # noqa: E731
    if ffn_chunked:
        ffn = 2 * d
    else:
        ffn = 2 * d + 4 + 3 * 2 * F_ + (2 * d + 2 * F_ if full else 0) + lora(("w1", "w2", "w3"))
    return {"input": 2 * d, "attention_norm": 4, "qkv_input": 2 * d + lora(("wq", "wk", "wv")),
            "attention": 2 * d + 4 * kv + 2 * d + 4 * H + (2 * d if flash else 0) + lora(("wo",)), "ffn": ffn}


def flash_workspace(m: ModelArgs, attn):
    """Bytes per token that FlashAttention-2's backward allocates for itself (flash-attn's mha_varlen_bwd): an fp32
    accumulator of dq for the heads of a call, and with grouped-query attention (fewer key/value heads) dk and dv
    expanded to every query head in bf16. attention.py calls it once for all heads (full) or twice, for half of
    the heads each, one after the other (s2, sf; with an odd count the shifted half, the larger, sets the peak)."""
    heads = m.n_heads if attn == "full" else m.n_heads - m.n_heads // 2
    return 4 * heads * m.head_dim + (2 * 2 * heads * m.head_dim if m.n_kv_heads != m.n_heads else 0)


def activation_peak(m: ModelArgs, ctx, batch, full=False, lora_r=8, targets=DEFAULT_TARGETS, chunk=CHUNK_SIZE,
                    attn="s2", flash=True, checkpointing=True, offload=False, ffn_chunks=True):
    """Peak bytes of activations of one micro-batch's forward and backward: what model.py keeps, with the
    gradients in flight at the widest moment of backward. flash: FlashAttention-2 kernels (train.py on a GPU
    with flash-attn); False: PyTorch's SDPA, e.g. on the CPU, whose scratch memory stays inside the kernel.
    ffn_chunks: False for train.py --no-ffn-chunks (the feed-forward over the whole sequence at once)."""
    d, kv, F_, V, L, hd = m.dim, m.n_kv_heads * m.head_dim, m.hidden_dim, m.vocab_size, m.n_layers, m.head_dim
    B, T = batch, ctx
    ffn_chunked = ffn_chunks and T > chunk
    part = layer_activations(m, full, lora_r, targets, ffn_chunked, flash)  # per token, see there
    # RoPE's cos and sin (fp32, head_dim/2 each) and the positions (int64), once per forward for every layer
    rope = (4 * hd + 8) * T
    # The loss, over chunks of `chunk` tokens of the flattened batch, runs backward first: the last block's output
    # (the chunks' input) and its gradient gathered from the chunks (2 x 2d, bf16), and one chunk's logits, at
    # most 12 bytes per vocabulary entry and token (the recomputed fp32 log-softmax, its gradient and the logits'
    # gradient alive together). It is done before the last block's backward begins.
    loss = 2 * 2 * d * B * T + 12 * V * min(chunk, B * T)
    if not checkpointing:
        return L * sum(part.values()) * B * T + rope + loss
    # With checkpointing each block keeps only its input (bf16: the embedding output is cast to the compute
    # dtype) until its backward recomputes it. Offloaded, those inputs wait in the host's pinned memory and the
    # GPU holds the one block's input that its recompute has brought back.
    saved_inputs = (1 if offload else L) * 2 * d * B * T
    # One block's backward, per token, at its widest moments (a test measures them, model.py on the CPU). Alive
    # throughout: the gradient arriving at the block's output, 2d (after the feed-forward, the residual's).
    g = 2 * d
    kept = sum(part.values()) - part["input"]  # the recomputed block's own saved tensors; its input is counted above
    ffn_tokens = B * (min(chunk, T) if ffn_chunked else T)
    if ffn_chunked:
        # The feed-forward's chunks, backward one after the other: every saved tensor of the block, the chunks'
        # input gradients gathered so far (2d), and one chunk's recomputed w1·x, silu(w1·x), w3·x with the
        # gradient arriving at their product and the two it gives (6 x 2F per chunk token; the chunk's ffn_norm
        # comes after, with fewer bytes)
        ffn = (g + kept + 2 * d) * B * T + 6 * 2 * F_ * ffn_tokens
    else:  # w1·x, silu(w1·x), w3·x are saved (kept); the gradient at their product and the two it gives
        ffn = (g + kept) * B * T + 3 * 2 * F_ * ffn_tokens
    # Attention's backward, after the feed-forward's (whose inputs are then freed): attention_norm's and wq/wk/wv's
    # saved tensors and attention's, with either wo's backward in flight (the gradient of its input through the
    # frozen weight, through the LoRA matrices, and their sum: 3 x 2d), or attention's own (the output's gradient,
    # dq, dk, dv: 2d + 2d + 4kv, plus FlashAttention-2's workspace; the unpacked output copy is freed by then).
    before = g + part["attention_norm"] + part["qkv_input"] + part["attention"]
    wo = (3 if not full and "wo" in targets else 1) * 2 * d
    attention = max(before + wo, before - (2 * d if flash else 0) + 2 * d + 2 * d + 4 * kv
                    + (flash_workspace(m, attn) if flash else 0))
    # Narrower moments, not counted: the recompute's RoPE of q (done CHUNK_SIZE tokens at a time) and its norms.
    return saved_inputs + rope + max(loss, ffn, attention * B * T)


def estimate(m: ModelArgs, ctx, attn, gpus, batch, accum, lora_r=8, targets=DEFAULT_TARGETS, embed=True,
             norms=True, full=False, group_size=None, sinks=4, chunk=CHUNK_SIZE, offload=False, ffn_chunks=True):
    """Per-GPU memory (bytes) and FLOPs per optimizer step of a bf16 FSDP run; see the comments for each term.
    chunk: memory.CHUNK_SIZE, tokens per chunk of the loss and of the feed-forward; offload: --offload-activations;
    ffn_chunks: False for --no-ffn-chunks."""
    c = param_counts(m, lora_r, targets, embed, norms, full)
    d, F_, V, L, H, hd = m.dim, m.hidden_dim, m.vocab_size, m.n_layers, m.n_heads, m.head_dim
    B, T, W = batch, ctx, gpus
    frozen = c["total"] - c["trainable"]
    mem = {}
    # Sharded state, split evenly across W GPUs by FSDP:
    mem["frozen weights (bf16)"] = 2 * frozen / W
    mem["trainable weights (fp32)"] = 4 * c["trainable"] / W
    mem["gradients (fp32)"] = 4 * c["trainable"] / W
    mem["AdamW state (2 x fp32)"] = 8 * c["trainable"] / W
    # FSDP's working set while the blocks run backward, where the activations peak: the block that computes plus
    # the one prefetched, all-gathered in bf16, one block's gradients before they are reduce-scattered, and the
    # root's tensors, which stay gathered from forward to the end of backward: the final norm (tok_embeddings and
    # output are units of their own, gathered only around their forward and backward: shard.py), or with tied
    # embeddings the embedding matrix too. (During the loss's backward the output matrix is gathered instead of
    # two blocks, with fewer activations.)
    block_grads = 2 * (c["block"] if full else c["trainable"] / L)
    root = d + (V * d if m.tie_embeddings else 0)
    mem["FSDP gathered weights (bf16)"] = 2 * (2 * c["block"] + root) + block_grads
    # Gradient accumulation: FSDP reduce-scatters the gradients after the last micro-batch only
    # (set_requires_gradient_sync), so until then every trainable tensor keeps an unsharded gradient, in fp32
    # (FSDP2 accumulates in the reduce dtype). Full fine-tuning reduces every micro-batch (see train.py).
    mem["unsharded gradients (fp32)"] = 4 * c["trainable"] if accum > 1 and W > 1 and not full else 0
    # FSDP2 reduce-scatters a unit's gradients in the reduce dtype, fp32 (shard.shard_model's MixedPrecisionPolicy):
    # it copies the unit's whole bf16 gradients into one flat fp32 buffer (each tensor padded to a multiple of W rows)
    # and reduce-scatters it into a second, the unit's 1/W share (fully_shard's foreach_reduce). Full fine-tuning
    # does this for every parameter: the largest unit counts (a block, or the embedding or output matrix). LoRA's
    # blocks reduce their few trainable numbers, the embeddings after the blocks' backward, their activations gone.
    unit = max(c["block"], V * d + (d if m.tie_embeddings else 0))
    mem["reduce-scatter staging (fp32)"] = 4 * unit * (1 + 1 / W) if full and W > 1 else 0
    # Activations: see activation_peak
    common = dict(full=full, lora_r=lora_r, targets=targets, chunk=chunk, attn=attn, ffn_chunks=ffn_chunks)
    mem["activations, checkpointing"] = activation_peak(m, T, B, offload=offload, **common)
    mem["activations, no checkpointing"] = activation_peak(m, T, B, checkpointing=False, **common)
    ffn_chunked = ffn_chunks and T > chunk
    static = sum(v for k, v in mem.items() if not k.startswith("activations"))
    # FLOPs per optimizer step, all GPUs together (a multiply-add counts 2):
    tokens = B * T * accum * W
    g = resolve_group_size(attn, T, group_size) if attn != "full" else None
    pairs = visible_pairs(attn, T, g, sinks, H)
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
    # A checkpoint save's host memory (checkpoint.py): LoRA's rank 0 holds the trainable tensors and AdamW's two
    # moments whole, fp32; full fine-tuning's DCP copies one tensor shard at a time to the host (its largest: the
    # embedding or a feed-forward matrix; DCP's 10 MB of copy-ahead left out).
    save_host = 4 * max(V * d, d * F_) / W if full else 12 * c["trainable"]
    return dict(params=c, memory=mem, static=static, tokens=tokens, group=g, attn_flops=attn_flops,
                host=L * 2 * d * B * T if offload else 0, save_host=save_host,
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
    lines.append(f"host memory of a checkpoint save: {e['save_host'] / GB:.2f} GB " + (
        "per GPU (each rank writes its own shards, one tensor at a time)" if full else
        "on rank 0's machine (rank 0 gathers the trainable tensors and AdamW's state)"))
    total = e["attn_flops"] + e["dense_flops"]
    lines.append(f"FLOPs per step (all GPUs): attention {e['attn_flops'] / 1e15:.1f} PFLOP, dense {e['dense_flops'] / 1e15:.1f} "
                 f"PFLOP, total {total / 1e15:.1f} PFLOP ({total / gpus / 1e15:.1f} per GPU; attention "
                 f"{100 * e['attn_flops'] / total:.0f}%)")
    lines.append("not counted: the CUDA context, library and NCCL buffers, and the caching allocator's fragmentation "
                 "(several GB per GPU; leave room for them, and set PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True)")
    return "\n".join(lines)


def config_args(path):
    """ModelArgs of a checkpoint directory from its config alone (no weights are read)."""
    for name in ("config.json", "params.json"):
        p = os.path.join(path, name)
        if os.path.isfile(p):
            with open(p) as f:
                cfg = json.load(f)
            if name == "config.json":
                return ModelArgs(**hf_config_fields(cfg, p))
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
                 sinks=a.sink_tokens, offload=a.offload_activations, ffn_chunks=not a.no_ffn_chunks)
    print(format_estimate(e, name, a.ctx, a.attn, a.gpus, a.batch_size, a.grad_accum, bool(a.from_scratch or a.full)))
    return 0
