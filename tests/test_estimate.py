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


@pytest.mark.parametrize("full,ffn_chunked", [(False, False), (True, False), (False, True), (True, True)])
def test_estimated_activations_are_what_autograd_saves(monkeypatch, full, ffn_chunked):
    """The per-layer activation formula against the bytes autograd keeps (bf16 model, full attention); with
    the feed-forward chunked, what its checkpointed chunks keep."""
    m = ModelArgs(dim=128, n_layers=2, n_heads=4, vocab_size=256, multiple_of=32, max_seq_len=512)
    torch.manual_seed(0)
    model = Transformer(m)
    monkeypatch.setattr(memory, "FFN_CHUNK_SIZE", 64 if ffn_chunked else 0)
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


def test_estimate_is_consistent_across_ctx_attention_and_checkpointing(capsys):
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
