"""bench.py and gpu_check.py: what can be checked without timing anything and without a GPU.

The figures themselves are never tested (a test cannot time a shared machine); what is tested is that a
bench reports what it measured: the memory of the device it ran on, and, without CUDA, no GPU claim.
"""
import argparse
import subprocess
import sys

import torch

import bench
import gpu_check
from conftest import ROOT


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
    r = subprocess.run([sys.executable, "bench.py", "gpu"], cwd=ROOT, capture_output=True, text=True)
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

    [(_, result, _, ok)] = gpu_check.check_attention("cpu", ["sdpa"])
    assert ok, result
    grouped = A._sdpa_grouped
    monkeypatch.setattr(A, "_sdpa_grouped", lambda *args: grouped(*args) * 1.03)
    [(_, result, _, ok)] = gpu_check.check_attention("cpu", ["sdpa"])
    assert not ok, result


def test_attention_bench_refuses_flash_on_fp32_or_cpu_with_one_error_line():
    r = subprocess.run([sys.executable, "bench.py", "attention", "--backend", "flash", "--device", "cuda"],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.splitlines() == ["error: --backend flash runs on CUDA fp16/bf16 only: add --device cuda --dtype bfloat16"]
