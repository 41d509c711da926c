"""The GPU acceptance check: does the CUDA path work end to end?

    python -m longlora.gpu_check         # one CUDA GPU, a stock PyTorch; flash-attn is used when it imports

It builds everything it needs in a temporary folder (a sentencepiece tokenizer and a tiny random
LLaMA, trained on Python standard-library source as text; nothing is downloaded), then checks:

  1. attention.attention() for every mode (full, s2, sf, and the wrap ablation of s2 and sf, with and
     without padding) at head_dim 64 and 128 in bf16 on CUDA, forward and backward, with the sdpa backend,
     and with flash when flash-attn >= 2.1 imports, against the fp32 reference on the same bf16 inputs.
     Tolerance: the largest error of the output and of dq, dk, dv, relative to the largest value of the
     reference, at most ATTN_TOL (bf16 keeps 8 bits of mantissa: one rounding is up to 0.4%);
  2. train.py, a LoRA fine-tuning at ctx CTX (over memory.CHUNK_SIZE: the chunked loss, feed-forward and
     RoPE run) with S²-Attn of a small model with head_dim 128, for STEPS steps, under torchrun (NCCL,
     FSDP2, bf16 weights; 2 ranks where 2 GPUs exist) and in one process (bf16 autocast): the loss goes
     down, a resume from the middle checkpoint repeats the losses within LOSS_TOL, and the peak memory
     train.py logs is shown; in one process again with --offload-activations: the same losses;
  2b. memory: train.py at ctx 32768 on a model of dim 2048 (8 layers, 0.4B parameters, 3.6 GB by the estimate,
     so that fixed workspaces weigh little), its peak allocated memory against `--estimate`'s total (with the
     attention kernels it ran), within MEM_TOL;
  3. sample.py with each KV cache (full, h2o, sink) in bf16 on CUDA: it generates every token asked for;
  4. `python -m longlora.eval ppl` in bf16 on CUDA equals the fp32 CPU result within LOSS_TOL (mean loss in nats);
     both split over the GPU and the CPU (`--devices cuda:0,cpu`, fp32: every activation, cache and RoPE angle
     crosses devices): sample.py runs with each cache, eval's loss equals the GPU's within LOSS_TOL; with two GPUs
     also over cuda:0,cuda:1, where sample.py's text must equal one GPU's;
  5. figures: attention forward+backward time of full, s2 and sf at T = 8k, 16k and 32k in bf16
     (B=1, H=8, D=64, as `python -m longlora.bench attention`), and train.py's tokens/s from check 2.

It prints one table and exits 1 if any check failed. Without CUDA it says so in one line and exits 0,
claiming nothing. CI does not run it. It lives in its own file, not in bench.py, because it is a
sequence of end-to-end runs of the CLIs rather than one benchmark, and bench.py stays readable.
"""
import json
import os
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time

import torch

from longlora.cli import Parser, entry

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the project: train.py, sample.py
ATTN_TOL = 0.02  # max |fast - reference| / max |reference|, outputs and gradients
LOSS_TOL = 0.02  # nats: bf16 against fp32, and a resumed bf16 run against the uninterrupted one
MEM_TOL = 0.05  # |measured peak - estimate| / estimate
CTX = 2048  # train.py's context in check 2: over memory.CHUNK_SIZE
STEPS = 8  # train.py steps per run; checkpoints at STEPS/2 and STEPS
TEXTS = ("argparse.py", "dataclasses.py", "pathlib.py", "typing.py")  # real text on every machine with Python


# ----------------------------------------------------------------------------- the table

def format_table(rows):
    """rows: (check, result, requirement, ok) -> a Markdown table and a last line with the verdict.
    ok is True, False, or None for a figure that has no target."""
    lines = ["| check | result | requirement | |", "| --- | --- | --- | --- |"]
    for check, result, requirement, ok in rows:
        lines.append(f"| {check} | {result} | {requirement} | {'' if ok is None else 'ok' if ok else 'FAILED'} |")
    failed = sum(ok is False for *_, ok in rows)
    lines.append(f"\n{failed} of {sum(ok is not None for *_, ok in rows)} checks failed" if failed else
                 f"\nall {sum(ok is not None for *_, ok in rows)} checks passed")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- what the checks run on

def make_workspace(work):
    """A tokenizer, a text corpus, a short prompt file and a tiny random base model (model.py's layout) under work/."""
    import sentencepiece as spm

    from model import Transformer, preset

    corpus = os.path.join(work, "corpus")
    os.makedirs(corpus)
    stdlib = sysconfig.get_paths()["stdlib"]
    for name in TEXTS:
        shutil.copy(os.path.join(stdlib, name), corpus)
    text = os.path.join(work, "corpus.txt")
    with open(text, "w", encoding="utf-8") as f:
        f.write("\n".join(open(os.path.join(corpus, n), encoding="utf-8").read() for n in TEXTS))
    spm.SentencePieceTrainer.train(
        input=text, model_prefix=os.path.join(work, "tokenizer"), model_type="bpe", vocab_size=512,
        byte_fallback=True, split_digits=True, bos_id=1, eos_id=2, unk_id=0, pad_id=-1, minloglevel=2)
    prompt = os.path.join(work, "prompt.txt")
    with open(prompt, "w", encoding="utf-8") as f:
        f.write(open(text, encoding="utf-8").read()[:120])  # about 80 tokens: the tiny model holds 128
    base = os.path.join(work, "base")
    torch.manual_seed(0)
    # head_dim 128, as LLaMA2's; 512 positions, so ctx CTX interpolates by 4
    Transformer(preset("tiny", vocab_size=512, dim=256, n_heads=2, n_kv_heads=1, max_seq_len=512)).save_pretrained(
        base, tokenizer_path=os.path.join(work, "tokenizer.model"))
    return base, corpus, prompt


def run(cmd, what):
    """Run a CLI of the project; its stdout, or a RuntimeError with the end of its stderr."""
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0:
        tail = (r.stderr or r.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"{what} exited with {r.returncode}: {' / '.join(tail)}")
    return r.stdout + r.stderr


# ----------------------------------------------------------------------------- 1. attention

def check_attention(device, backends, head_dims=(64, 128)):
    """(check, result, requirement, ok) rows: each backend and mode against the reference, bf16 fwd + bwd."""
    from attention import attention

    cases = [("full", False, None), ("s2", False, None), ("sf", False, None), ("s2", True, None),
             ("sf", True, None), ("s2", False, (256, 131)), ("sf", False, (256, 131))]
    cases = [(mode, wrap, lengths, D) for D in head_dims for mode, wrap, lengths in cases]
    B, T, H, H_kv = 2, 256, 8, 4
    g = torch.Generator().manual_seed(0)
    rows = []
    for backend in backends:
        worst, where = 0.0, ""
        for mode, wrap, lengths, D in cases:
            q = torch.randn(B, T, H, D, generator=g).to(device, torch.bfloat16)
            k, v = (torch.randn(B, T, H_kv, D, generator=g).to(device, torch.bfloat16) for _ in range(2))
            grad = torch.randn(B, T, H, D, generator=g).to(device, torch.bfloat16)
            kw = dict(group_size=64, sink_tokens=4, wrap=wrap,
                      lengths=None if lengths is None else torch.tensor(lengths, device=device))
            results = []
            for dtype, name in ((torch.bfloat16, backend), (torch.float32, "reference")):
                leaves = [t.to(dtype, copy=True).requires_grad_() for t in (q, k, v)]
                out = attention(*leaves, mode, backend=name, **kw)
                out.backward(grad.to(dtype))
                results.append([out, *(t.grad for t in leaves)])
            for what, fast, ref in zip(("out", "dq", "dk", "dv"), *results):
                err = ((fast.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-6)).item()
                if err > worst:
                    worst, where = err, f"{mode}{' wrap' if wrap else ''}{' padded' if lengths else ''} D={D} {what}"
        rows.append((f"attention {backend}, bf16, fwd + bwd vs fp32 reference ({len(cases)} cases, head_dim "
                     f"{' and '.join(map(str, head_dims))})",
                     f"worst {worst:.4f} ({where})", f"<= {ATTN_TOL}", worst <= ATTN_TOL))
    return rows


# ----------------------------------------------------------------------------- 2. train.py

def losses(run_dir):
    """{step: loss} and the last step's record from train.py's metrics.jsonl."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        recs = [json.loads(line) for line in f if line.strip()]
    steps = [r for r in recs if "loss" in r]
    return {r["step"]: r["loss"] for r in steps}, steps


def check_train(base, corpus, work, launcher, label, offload=False):
    """Train STEPS steps, then resume from the middle checkpoint; rows and the median tokens/s. With offload, also
    a run with --offload-activations, whose losses must be the first run's."""
    out = os.path.join(work, f"run-{label.split()[0]}")
    argv = ["--model", base, "--data", corpus, "--ctx", str(CTX), "--attn", "s2", "--steps", str(STEPS),
            "--batch-size", "2", "--grad-accum", "1", "--lr", "5e-3", "--warmup", "1",
            "--save-every", str(STEPS // 2), "--token-cache", os.path.join(work, "tokens"), "--out", out]
    run([*launcher, os.path.join(ROOT, "train.py"), *argv], f"train.py ({label})")
    first, recs = losses(out)
    half = STEPS // 2
    early, late = statistics.mean(first[s] for s in (1, 2)), statistics.mean(first[s] for s in (STEPS - 1, STEPS))
    run([*launcher, os.path.join(ROOT, "train.py"), *argv, "--resume", os.path.join(out, "checkpoints", f"step-{half:06d}")],
        f"train.py --resume ({label})")
    again, _ = losses(out)
    drift = max(abs(again[s] - first[s]) for s in range(half + 1, STEPS + 1))
    tokens_per_s = statistics.median(r["tokens_per_s"] for r in recs[1:])  # the first step warms up
    rows = []
    if offload:
        off = out + "-offload"
        run([*launcher, os.path.join(ROOT, "train.py"), *argv[:-1], off, "--offload-activations"],
            f"train.py --offload-activations ({label})")
        moved, off_recs = losses(off)
        diff = max(abs(moved[s] - first[s]) for s in first)
        rows = [(f"train.py {label} --offload-activations: the same losses", f"max difference {diff:.4f}; peak memory "
                 f"{off_recs[-1]['peak_mem_gb']:.2f} GB (without: {recs[-1]['peak_mem_gb']:.2f})", f"<= {LOSS_TOL}",
                 diff <= LOSS_TOL)]
    return rows + [
        (f"train.py {label}: loss goes down", f"{early:.3f} (steps 1-2) -> {late:.3f} (steps {STEPS - 1}-{STEPS})",
         "lower", late < early),
        (f"train.py {label}: resume at step {half} repeats steps {half + 1}-{STEPS}", f"max difference {drift:.4f}",
         f"<= {LOSS_TOL}", drift <= LOSS_TOL),
        (f"train.py {label}: peak memory", f"{recs[-1]['peak_mem_gb']:.2f} GB", "printed", None),
    ], tokens_per_s


def check_memory(work, corpus, launcher, gpus, flash, label):
    """train.py's peak allocated memory against the estimate's total for the same run. The model is wide enough
    (dim 2048, head_dim 128, ctx 32768) that what the estimate counts tensor by tensor dominates."""
    from longlora.estimate import activation_peak, estimate
    from model import ModelArgs, Transformer

    T = 32768
    m = ModelArgs(dim=2048, n_layers=8, n_heads=16, vocab_size=512, multiple_of=256, max_seq_len=4096)
    base = os.path.join(work, "base-wide")
    torch.manual_seed(0)
    Transformer(m).to(torch.bfloat16).save_pretrained(base, tokenizer_path=os.path.join(work, "tokenizer.model"))
    out = os.path.join(work, f"run-memory-{label.split()[0]}")
    run([*launcher, os.path.join(ROOT, "train.py"), "--model", base, "--data", corpus, "--ctx", str(T), "--attn", "s2",
         "--steps", "2", "--batch-size", "1", "--grad-accum", "1", "--save-every", "2", "--heldout", "0",
         "--token-cache", os.path.join(work, "tokens"), "--out", out], f"train.py memory ({label})")
    measured = losses(out)[1][-1]["peak_mem_gb"] * 1e9
    e = estimate(m, T, "s2", gpus, 1, 1)  # with FlashAttention-2's kernels; the SDPA ones where flash-attn is absent
    expected = e["total_ckpt"] - e["memory"]["activations, checkpointing"] + activation_peak(m, T, 1, attn="s2", flash=flash)
    err = abs(measured - expected) / expected
    return [(f"train.py {label}: peak allocated memory vs --estimate (dim 2048, ctx {T}, s2)",
             f"{measured / 1e9:.3f} GB vs {expected / 1e9:.3f} GB ({100 * err:.1f}% apart)", f"<= {100 * MEM_TOL:.0f}%",
             err <= MEM_TOL)]


# ----------------------------------------------------------------------------- 3. sample.py, 4. longlora/eval.py

# each cache's own flags (sample.py refuses a flag of another cache)
CACHE_FLAGS = {"full": [], "h2o": ["--heavy", "16", "--recent", "16"], "sink": ["--recent", "16"]}


def check_sample(base, prompt, device):
    rows = []
    for cache, flags in CACHE_FLAGS.items():
        text = run([sys.executable, os.path.join(ROOT, "sample.py"), "--model", base, "--prompt", prompt,
                    "--max-new-tokens", "32", "--temperature", "0", "--kv-cache", cache, *flags,
                    "--dtype", "bfloat16", "--device", device], f"sample.py --kv-cache {cache}")
        rows.append((f"sample.py --kv-cache {cache}, bf16, {device}", text.strip().splitlines()[-1][:80],
                     "runs to the end", True))
    return rows


def check_eval(base, corpus, work, device):
    loss = {}
    for dev, dtype in ((device, "bfloat16"), ("cpu", "float32")):
        out = os.path.join(work, f"ppl-{dev}.json")
        run([sys.executable, "-m", "longlora.eval", "ppl", "--model", base, "--data", corpus, "--seq-lens", "256",
             "--stride", "0", "--max-tokens", "16384", "--dtype", dtype, "--device", dev, "--out", out], f"longlora.eval ppl ({dev})")
        with open(out) as f:
            loss[dev] = json.load(f)["results"][0]["loss"]
    diff = abs(loss[device] - loss["cpu"])
    return [(f"longlora.eval ppl, bf16 {device} vs fp32 cpu (mean loss)", f"{loss[device]:.4f} vs {loss['cpu']:.4f}",
             f"within {LOSS_TOL}", diff <= LOSS_TOL)]


def check_split(base, prompt, corpus, work, split):
    """sample.py and eval with the layers split over `split` (longlora/devices.py), in fp32: sample.py runs with each
    cache and prints the split; eval's perplexity equals the first device's within LOSS_TOL; over devices of one kind
    (cuda:0,cuda:1: the same arithmetic as one of them) sample.py's text equals the first device's."""
    rows, where = [], ",".join(split)
    for cache, flags in CACHE_FLAGS.items():
        args = [sys.executable, os.path.join(ROOT, "sample.py"), "--model", base, "--prompt", prompt, "--max-new-tokens", "32",
                "--temperature", "0", "--kv-cache", cache, *flags, "--dtype", "float32"]
        text = run(args + ["--devices", where], f"sample.py --devices {where} --kv-cache {cache}")
        split_line = next((line for line in text.splitlines() if line.startswith("layers ")), "")
        same = None  # the GPU's and the CPU's arithmetic differ: no target then
        if len({d.split(":")[0] for d in split}) == 1:  # devices of one kind: the text of one of them, exactly
            one = run(args + ["--device", split[0]], f"sample.py --device {split[0]} --kv-cache {cache}")
            same = text.replace(split_line + "\n", "").split("prefill:")[0] == one.split("prefill:")[0]
        rows.append((f"sample.py --devices {where} --kv-cache {cache}, fp32", split_line or "no split printed",
                     "runs, prints the split" + ("" if same is None else f", the text of --device {split[0]}"),
                     bool(split_line) and same is not False))
    loss = {}
    for flag, value in (("--devices", where), ("--device", split[0])):
        out = os.path.join(work, f"ppl-split-{flag}.json")
        run([sys.executable, "-m", "longlora.eval", "ppl", "--model", base, "--data", corpus, "--seq-lens", "256", "--stride",
             "0", "--max-tokens", "16384", "--dtype", "float32", flag, value, "--out", out], f"longlora.eval ppl {flag} {value}")
        with open(out) as f:
            loss[flag] = json.load(f)["results"][0]["loss"]
    return rows + [(f"longlora.eval ppl --devices {where} vs --device {split[0]}, fp32 (mean loss)",
                    f"{loss['--devices']:.6f} vs {loss['--device']:.6f}", f"within {LOSS_TOL}",
                    abs(loss["--devices"] - loss["--device"]) <= LOSS_TOL)]


# ----------------------------------------------------------------------------- 5. figures

def attention_figures(device, Ts=(8192, 16384, 32768)):
    """Forward+backward ms of full, s2 and sf in bf16 (median of 5 after a warm-up), as `python -m longlora.bench attention`."""
    from longlora.bench import MODES, _step

    rows = []
    g = torch.Generator().manual_seed(0)
    for T in Ts:
        q, k, v = (torch.randn(1, T, 8, 64, generator=g).to(device, torch.bfloat16).requires_grad_() for _ in range(3))
        grad = torch.randn(1, T, 8, 64, generator=g).to(device, torch.bfloat16)
        ms = {}
        for mode in MODES:
            _step(q, k, v, grad, mode, "auto")
            times = []
            for _ in range(5):
                torch.cuda.synchronize(device)
                t0 = time.perf_counter()
                _step(q, k, v, grad, mode, "auto")
                torch.cuda.synchronize(device)
                times.append(time.perf_counter() - t0)
            ms[mode] = statistics.median(times) * 1e3
        rows.append((f"attention bf16 fwd + bwd, T={T}", f"full {ms['full']:.2f} ms, s2 {ms['s2']:.2f} ms, sf {ms['sf']:.2f} ms",
                     f"s2 speed-up vs full {ms['full'] / ms['s2']:.2f}x", None))
    return rows


# ----------------------------------------------------------------------------- main

@entry
def main(argv=None):
    Parser(description="The GPU acceptance check: attention backends in bf16 against the reference, train.py under "
                       "torchrun and in one process, sample.py with each cache, eval against the CPU, and GPU figures, in "
                       "one table. Without CUDA it prints one line and exits 0.",
           examples=["python -m longlora.gpu_check"]).parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: the GPU acceptance check needs one; nothing was checked")
        return 0
    from attention import flash_varlen

    device = "cuda"
    t_start = time.perf_counter()
    backends = ["sdpa"] + (["flash"] if flash_varlen()[0] is not None else [])
    print(f"GPU acceptance check on {torch.cuda.get_device_name()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
          f"attention backends {', '.join(backends)}{'' if 'flash' in backends else ' (flash-attn >= 2.1 not importable)'}",
          flush=True)
    rows = []
    gpus = min(2, torch.cuda.device_count())  # FSDP2 across 2 ranks where there are 2 GPUs
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}"]
    distributed = f"torchrun --nproc_per_node={gpus} (NCCL, FSDP2, bf16)"
    with tempfile.TemporaryDirectory() as work:
        base, corpus, prompt = make_workspace(work)
        speeds = {}

        def train(launcher, label, offload=False):
            result, speeds[label] = check_train(base, corpus, work, launcher, label, offload)
            return result

        steps = [
            ("attention", lambda: check_attention(device, backends)),
            ("train torchrun", lambda: train(torchrun, distributed)),
            ("train one process", lambda: train([sys.executable], "one process (bf16 autocast)", offload=True)),
            ("memory", lambda: check_memory(work, corpus, torchrun, gpus, "flash" in backends, distributed)),
            ("sample", lambda: check_sample(base, prompt, device)),
            ("eval", lambda: check_eval(base, corpus, work, device)),
            ("split", lambda: check_split(base, prompt, corpus, work, ["cuda:0", "cpu"])),
            *([("split over GPUs", lambda: check_split(base, prompt, corpus, work, ["cuda:0", "cuda:1"]))]
              if torch.cuda.device_count() > 1 else []),
            ("figures", lambda: attention_figures(device)),
        ]
        for name, step in steps:
            t0 = time.perf_counter()
            try:
                rows += step()
            except Exception as e:  # one broken part must not hide the others: record it and go on
                rows.append((name, f"{type(e).__name__}: {str(e)[:160]}", "runs", False))
            print(f"  {name}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        for label, tps in speeds.items():
            rows.append((f"train.py tokens/s, {label}, dim 256, head_dim 128, ctx {CTX}, batch 2", f"{tps:,.0f}", "", None))
    print(format_table(rows))
    print(f"(total {time.perf_counter() - t_start:.0f} s)")
    return 1 if any(ok is False for *_, ok in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
