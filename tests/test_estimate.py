"""longlora/estimate.py (train.py --estimate): parameter counts against LLaMA2-7B's published size, activation bytes
against autograd's saved tensors, attention FLOPs against attention.py's masks, and the scaling laws."""

import os
import re

import pytest
import torch

from conftest import ROOT
import train
from attention import attention_pattern
from longlora.estimate import estimate, layer_activations, param_counts, visible_pairs
from lora import apply_lora, mark_trainable
from longlora import memory
from model import ModelArgs, Transformer, apply_rope, preset, rope_angles, rope_frequencies



def test_estimate_counts_llama2_7b_and_its_lora_exactly():
    c = param_counts(preset("llama2-7b"), 8, ("wq", "wk", "wv", "wo"), True, True, full=False)
    assert c["total"] == 6_738_415_616  # LLaMA-2-7B's published parameter count
    assert c["lora"] == 32 * 4 * 8 * (4096 + 4096)  # r x (in + out) for four 4096x4096 matrices per layer
    assert c["trainable"] == c["lora"] + 32000 * 4096 + 65 * 4096  # + embeddings + 65 RMSNorms


# (ModelArgs overrides of the tiny preset, LoRA targets, embed, norms, full): GQA, tied embeddings, an odd head count
# with a set feed-forward width, every LoRA target including the output head, and full fine-tuning
COUNT_CASES = [
    (dict(), ("wq", "wk", "wv", "wo"), True, True, False),
    (dict(tie_embeddings=True), ("wq", "wk", "wv", "wo", "w1", "w2", "w3"), True, False, False),
    (dict(dim=72, n_heads=9, n_kv_heads=3, ffn_hidden_dim=100), ("wq", "wk", "wv", "wo", "w1", "w2", "w3", "output"),
     False, True, False),
    (dict(n_kv_heads=1), (), True, True, True),
    (dict(tie_embeddings=True), (), True, True, True),
]


@pytest.mark.parametrize("overrides,targets,embed,norms,full", COUNT_CASES)
def test_parameter_counts_are_the_models_own(overrides, targets, embed, norms, full):
    """param_counts against the parameters of the model itself (built on the meta device, LoRA applied, marked
    trainable as train.py does): total, trainable, LoRA, one block and the matrices that multiply every token."""
    m = preset("tiny", **overrides)
    with torch.device("meta"):
        model = Transformer(m)
        if not full:
            apply_lora(model, r=4, targets=targets)
            mark_trainable(model, embed=embed, norms=norms)
    params = dict(model.named_parameters())  # a tied weight once
    is_lora = lambda n: n.endswith(("lora_a", "lora_b"))  # noqa: E731
    c = param_counts(m, 4, targets, embed, norms, full)
    assert c["total"] == sum(p.numel() for n, p in params.items() if not is_lora(n))
    assert c["trainable"] == sum(p.numel() for p in params.values() if p.requires_grad or full)
    assert c["lora"] == sum(p.numel() for n, p in params.items() if is_lora(n))
    assert c["block"] == sum(p.numel() for p in model.layers[0].parameters())
    matrices = [n for n, p in params.items() if p.ndim == 2 and not is_lora(n) and n != "tok_embeddings.weight"]
    assert c["matmul"] == sum(params[n].numel() for n in matrices) + (m.vocab_size * m.dim if m.tie_embeddings else 0)


def test_only_lora_accumulating_over_several_gpus_keeps_whole_fp32_gradients_and_tied_embeddings_stay_gathered():
    """The unsharded fp32 gradients are there only when gradients wait across micro-batches (--grad-accum > 1) on
    more than one GPU with LoRA; a tied embedding matrix, the output head too, stays gathered in bf16 while the
    blocks run backward."""
    m = preset("llama2-7b")
    trainable = param_counts(m, 8, ("wq", "wk", "wv", "wo"), True, True, full=False)["trainable"]
    unsharded = lambda gpus, accum, full=False: estimate(m, 8192, "s2", gpus, 1, accum, full=full)["memory"][  # noqa: E731
        "unsharded gradients (fp32)"]
    assert unsharded(8, 8) == 4 * trainable
    assert unsharded(8, 1) == unsharded(1, 8) == unsharded(8, 8, full=True) == 0
    tied = preset("llama2-7b", tie_embeddings=True)
    gathered = lambda args: estimate(args, 8192, "s2", 8, 1, 8)["memory"]["FSDP gathered weights (bf16)"]  # noqa: E731
    assert gathered(tied) - gathered(m) == 2 * m.vocab_size * m.dim


@pytest.mark.parametrize("full,ffn_chunked", [(False, False), (True, False), (False, True), (True, True)])
def test_estimated_activations_are_what_autograd_saves(monkeypatch, full, ffn_chunked):
    """The per-layer activation formula against the bytes autograd keeps (bf16 model, full attention); with
    the feed-forward chunked, what its checkpointed chunks keep. A sequence of exactly one chunk is not chunked."""
    m = ModelArgs(dim=128, n_layers=2, n_heads=4, vocab_size=256, multiple_of=32, max_seq_len=512)
    torch.manual_seed(0)
    model = Transformer(m)
    monkeypatch.setattr(memory, "FFN_CHUNK_SIZE", 64 if ffn_chunked else 256)  # 256: T itself
    if not full:
        apply_lora(model)
        mark_trainable(model)
    model.to(torch.bfloat16)
    T = 256
    h = model.tok_embeddings(torch.randint(0, 256, (1, T))).detach().requires_grad_()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    # RoPE's cos/sin are computed once per forward and shared by the layers, as Transformer.forward does
    cos, sin = rope_angles(torch.arange(T), rope_frequencies(m))
    shared = {cos.untyped_storage().data_ptr(), sin.untyped_storage().data_ptr()}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        for layer in model.layers:
            h = layer(h, torch.arange(T), rotate=lambda x, p: apply_rope(x, cos, sin), lean=True)  # as train.py runs it
    measured = sum(v for k, v in saved.items() if k not in params | shared) / (m.n_layers * T)
    assert abs(measured - sum(layer_activations(m, full=full, ffn_chunked=ffn_chunked).values())) <= 0.01 * measured


@pytest.mark.parametrize("mode", ["full", "s2", "sf"])
@pytest.mark.parametrize("H", [2, 9])
def test_attention_flops_count_the_pairs_attention_py_allows(mode, H):
    T, g = 64, 16
    pattern = attention_pattern(mode, T, H, group_size=g if mode != "full" else None, sink_tokens=4)
    assert visible_pairs(mode, T, g, 4, H) == pytest.approx(pattern.sum().item() / H, rel=1e-12)  # a head's mean


def test_estimate_grows_linearly_with_ctx_s2_computes_the_pairs_its_groups_allow_and_checkpointing_saves_memory(capsys):
    m = preset("llama2-7b")
    e = {T: estimate(m, T, "s2", 8, 1, 8) for T in (8192, 16384, 32768)}
    for T in e:
        assert e[T]["total_ckpt"] < e[T]["total_no_ckpt"]
    a = [e[T]["memory"]["activations, checkpointing"] for T in (8192, 16384, 32768)]
    # linear in T at batch 1 plus a constant (the chunks of the loss and of the feed-forward)
    assert abs((a[2] - a[1]) / (a[1] - a[0]) - 2) < 0.01
    full, s2 = estimate(m, 32768, "full", 8, 1, 8), e[32768]
    # T = 4g: plain heads have 4 triangles of side g, shifted heads 3 and two of side g/2, full one of side 4g
    expected = (4 + 3 + 2 / 4) / 2 / 16
    assert abs(s2["attn_flops"] / full["attn_flops"] - expected) < 1e-3 and s2["dense_flops"] == full["dense_flops"]
    assert train.main(["--estimate", "--preset", "llama2-7b", "--ctx", "32768", "--gpus", "8"]) == 0
    out = capsys.readouterr().out
    assert "total with checkpointing" in out and "attention" in out and "6.74B" in out


def test_full_fine_tuning_estimate_shards_fp32_weights_gradients_and_adamw_of_every_parameter(capsys):
    """train.py --estimate --full reaches estimate's full fine-tuning: 16 bytes per parameter, sharded."""
    assert train.main(["--estimate", "--full", "--preset", "llama2-7b", "--ctx", "8192", "--gpus", "8"]) == 0
    out = capsys.readouterr().out
    assert "trainable 6.74B (full fine-tuning)" in out
    e = estimate(preset("llama2-7b"), 8192, "s2", 8, 1, 8, full=True)
    sharded = sum(e["memory"][k] for k in ("frozen weights (bf16)", "trainable weights (fp32)", "gradients (fp32)",
                                           "AdamW state (2 x fp32)"))
    assert abs(sharded - 16 * 6_738_415_616 / 8) < 1e3 and e["memory"]["frozen weights (bf16)"] == 0
    lora = estimate(preset("llama2-7b"), 8192, "s2", 8, 1, 8)
    assert e["total_ckpt"] > lora["total_ckpt"] + 10e9  # the paper: 46.3 GB (full) against 25.6 GB (LoRA+) at 8k


def test_the_documented_memory_table_is_what_the_estimate_computes():
    """docs/memory.md's table (`train.py --estimate --preset llama2-XB --ctx N --gpus 8`, with and without
    --offload-activations): every figure in it is this estimate's, rounded as printed there."""
    readme = open(os.path.join(ROOT, "docs", "memory.md"), encoding="utf-8").read()
    rows = re.findall(r"^\| (\d+)B \| (\d+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| \*\*([\d.]+)\*\* \| ([\d.]+) \| ([\d.]+) \|",
                      readme, re.M)
    assert [(int(r[0]), int(r[1])) for r in rows] == [(7, 8192), (7, 16384), (7, 32768), (7, 65536), (7, 100000),
                                                     (13, 32768), (13, 65536), (70, 32768), (70, 65536)]
    for size, ctx, *figures in rows:
        e = estimate(preset(f"llama2-{size}b"), int(ctx), "s2", 8, 1, 8)
        off = estimate(preset(f"llama2-{size}b"), int(ctx), "s2", 8, 1, 8, offload=True)
        mem = e["memory"]
        sharded = sum(v for k, v in mem.items() if k.startswith(("frozen", "trainable", "gradients", "AdamW")))
        gathered = mem["FSDP gathered weights (bf16)"] + mem["unsharded gradients (fp32)"]
        ours = [sharded, gathered, mem["activations, checkpointing"], e["total_ckpt"], off["total_ckpt"], off["host"]]
        for printed, value in zip(figures, ours):
            assert printed == f"{value / 1e9:.{len(printed.split('.')[1])}f}", (size, ctx, printed, value / 1e9)


def test_offloading_moves_the_block_inputs_from_the_gpu_to_the_host():
    m, T = preset("llama2-70b"), 65536
    on, off = estimate(m, T, "s2", 8, 1, 8, offload=True), estimate(m, T, "s2", 8, 1, 8)
    inputs = m.n_layers * 2 * m.dim * T  # every block's bf16 input
    assert on["host"] == inputs and off["host"] == 0
    moved = off["memory"]["activations, checkpointing"] - on["memory"]["activations, checkpointing"]
    assert moved == inputs - 2 * m.dim * T  # one block's input is back on the GPU for its recompute
    assert train.main(["--estimate", "--preset", "llama2-70b", "--ctx", "65536", "--offload-activations"]) == 0


def test_the_estimate_says_what_it_leaves_out_and_counts_the_whole_feed_forward_with_no_ffn_chunks(capsys):
    import train

    argv = ["--estimate", "--preset", "llama2-7b", "--ctx", "32768", "--gpus", "8"]
    outs = []
    for extra in ([], ["--no-ffn-chunks"]):
        assert train.main(argv + extra) == 0
        outs.append(capsys.readouterr().out)
    assert all("not counted: the CUDA context, library and NCCL buffers, and the caching allocator's fragmentation" in o
               for o in outs)
    m = preset("llama2-7b")
    chunked, whole = estimate(m, 32768, "s2", 8, 1, 8), estimate(m, 32768, "s2", 8, 1, 8, ffn_chunks=False)
    # whole: no second forward of the feed-forward (2 FLOPs x 3 matrices of dim x hidden per token and layer), more memory
    tokens = 32768 * 8 * 8
    assert chunked["dense_flops"] - whole["dense_flops"] == 2 * 3 * m.dim * m.hidden_dim * m.n_layers * tokens
    assert whole["memory"]["activations, checkpointing"] > chunked["memory"]["activations, checkpointing"]
    assert f"{whole['dense_flops'] / 1e15:.1f} PFLOP" in outs[1] and f"{chunked['dense_flops'] / 1e15:.1f} PFLOP" in outs[0]


@pytest.mark.parametrize("size", ["7b", "70b"])
def test_full_fine_tuning_counts_the_fp32_reduce_scatter_of_the_largest_fsdp_unit_and_a_saves_host_memory(size):
    """Against LLaMA2's real modules (built on the meta device): the reduce-scatter staging is 4 bytes x (1 + 1/8) x
    the largest FSDP unit (shard.shard_model: a block, the embeddings, the output); a checkpoint save holds one
    rank's share of the largest tensor on the host (--full) or every trainable tensor with AdamW's two moments
    whole (LoRA+, rank 0)."""
    m = preset(f"llama2-{size}")
    with torch.device("meta"):
        model = Transformer(m)
    numel = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    units = [numel(b) for b in model.layers] + [numel(model.tok_embeddings), numel(model.output)]
    full, lora = estimate(m, 8192, "s2", 8, 1, 8, full=True), estimate(m, 8192, "s2", 8, 1, 8)
    assert full["memory"]["reduce-scatter staging (fp32)"] == 4 * max(units) * (1 + 1 / 8)
    assert lora["memory"]["reduce-scatter staging (fp32)"] == 0
    assert full["save_host"] == 4 * max(p.numel() for p in model.parameters()) / 8
    apply_lora(model)
    mark_trainable(model)
    assert lora["save_host"] == 12 * sum(p.numel() for p in model.parameters() if p.requires_grad)
