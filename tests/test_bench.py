"""bench.py and gpu_check.py: what can be checked without timing anything and without a GPU.

The figures themselves are never tested (a test cannot time a shared machine); what is tested is the bench's
correctness side and that a bench reports what it measured: the peer it times (HF transformers + PEFT)
computes our training loss and HF's generate our tokens, as the bench prints; the memory is the device's it
ran on; without CUDA there is no GPU claim.
"""
import argparse
import subprocess
import sys

import torch
import torch.nn.functional as F

from longlora import bench
from longlora import gpu_check
from conftest import ROOT
from sample import generate
from train import token_loss_sum

PEER_LOSS_TOL = 1e-4  # the bench's "same loss at step 1" threshold (mean cross-entropy per token, fp32)


def test_hf_peft_peer_has_our_training_loss_and_gradients_at_step_1():
    T = 256  # twice the tiny preset's context: the RoPE scaling (2) is part of the comparison
    x = torch.randint(0, 256, (1, T + 1), generator=torch.Generator().manual_seed(1))
    x, y = x[:, :-1], x[:, 1:]  # (B, T) each
    for mode in bench.MODES:
        ours = bench._ours_model("tiny", T, mode)
        peer = bench._peer_model(ours, mode)
        loss = token_loss_sum(ours, x, y, None, torch.autocast("cpu", enabled=False)) / y.numel()
        peer_loss = F.cross_entropy(peer(input_ids=x).logits.float().flatten(0, 1), y.flatten())
        assert abs(loss.item() - peer_loss.item()) <= PEER_LOSS_TOL, (mode, loss.item(), peer_loss.item())
        # the same trainable tensors get the same gradients (embeddings and a LoRA B, in both namings)
        (loss + peer_loss).backward()
        ours_grads = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
        peer_grads = {n: p.grad for n, p in peer.named_parameters() if p.requires_grad}
        assert len(ours_grads) == len(peer_grads)
        emb = next(g for n, g in peer_grads.items() if "embed_tokens" in n)
        assert torch.allclose(ours_grads["tok_embeddings.weight"], emb, atol=1e-5, rtol=1e-3), mode
        lora_b = next(g for n, g in peer_grads.items() if "layers.1.self_attn.v_proj.lora_B" in n)
        assert torch.allclose(ours_grads["layers.1.attention.wv.lora_b"], lora_b, atol=1e-5, rtol=1e-3), mode


def test_hf_generate_gives_our_greedy_tokens():
    hf, ours = bench._hf_and_ours("tiny")
    prompt = torch.randint(0, ours.args.vocab_size, (32,), generator=torch.Generator().manual_seed(0)).tolist()
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        theirs = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=64, do_sample=False)[0, 32:]
    assert list(generate(ours, prompt, 64)) == theirs.tolist()


def test_train_bench_on_the_cpu_reports_cpu_memory_even_where_cuda_exists(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a CUDA machine, benching on the CPU

    def cuda_allocator(*args, **kwargs):
        raise AssertionError("the CPU bench read the CUDA allocator")

    for name in ("synchronize", "memory_allocated", "max_memory_allocated", "reset_peak_memory_stats"):
        monkeypatch.setattr(torch.cuda, name, cuda_allocator)
    measured = []
    peak = bench._peak_alloc_bytes
    monkeypatch.setattr(bench, "_peak_alloc_bytes", lambda fn, cuda: measured.append((cuda, peak(fn, cuda))) or measured[-1][1])
    args = argparse.Namespace(preset="demo", ctx=64, batch_size=1, repeats=1, threads=0, no_peer=True)
    bench.bench_train(args)
    assert [cuda for cuda, _ in measured] == [False] * 3  # full, s2, sf: the CPU's memory
    assert all(n > 2**20 for _, n in measured)  # AdamW state and gradients of the embeddings alone exceed 1 MiB
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ours")]
    assert len(rows) == 3 and all(int(row.split("|")[-2]) >= 1 for row in rows)  # printed in MiB, not ~0


def test_gpu_check_without_cuda_says_so_in_one_line_and_exits_0():
    r = subprocess.run([sys.executable, "-m", "longlora.gpu_check"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0 and r.stderr == ""
    assert r.stdout.splitlines() == ["no CUDA device: the GPU acceptance check needs one; nothing was checked"]


def test_gpu_check_table_marks_each_check_and_counts_the_failures():
    rows = [("a", "1.0", "<= 2", True), ("b", "3.0", "<= 2", False), ("figure", "5 ms", "", None)]
    lines = gpu_check.format_table(rows).splitlines()
    assert lines[:2] == ["| check | result | requirement | |", "| --- | --- | --- | --- |"]
    assert lines[2:5] == ["| a | 1.0 | <= 2 | ok |", "| b | 3.0 | <= 2 | FAILED |", "| figure | 5 ms |  |  |"]
    assert lines[-1] == "1 of 2 checks failed"
    assert gpu_check.format_table(rows[:1]).splitlines()[-1] == "all 1 checks passed"


def test_gpu_checks_attention_comparison_passes_sdpa_and_catches_a_wrong_result(monkeypatch):
    # the same comparison the GPU runs, here on CPU bf16; a backend 3% off must fail it
    import attention as A

    [(_, result, _, ok)] = gpu_check.check_attention("cpu", ["sdpa"], head_dims=(64,))
    assert ok, result
    grouped = A._sdpa_grouped
    monkeypatch.setattr(A, "_sdpa_grouped", lambda *args: grouped(*args) * 1.03)
    [(_, result, _, ok)] = gpu_check.check_attention("cpu", ["sdpa"], head_dims=(64,))
    assert not ok, result


def test_attention_bench_refuses_flash_in_fp32_with_one_error_line():
    r = subprocess.run([sys.executable, "-m", "longlora.bench", "attention", "--backend", "flash", "--device", "cuda"],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.splitlines() == ["error: --backend flash runs on CUDA fp16/bf16 only: add --device cuda --dtype bfloat16"]
