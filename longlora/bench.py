"""Benchmarks, one subcommand per part of the project. Speed targets are checked here, never in tests.

    python -m longlora.bench attention            # full vs S²-Attn vs SF-Attn, T = 2048 .. 16384, fp32 and bf16
    python -m longlora.bench attention --quick    # the same at T = 1024, 2048 (seconds instead of minutes)
    python -m longlora.bench train --threads 1    # one LoRA training step at ctx 4096: full, s2, sf, and HF + PEFT;
                                                  # then at vocab 32000, ctx 8192: the loss and feed-forward whole vs chunked
    python -m longlora.bench sample               # decode tokens/s: KV cache vs recomputation, h2o vs full, ours vs HF
    python -m longlora.gpu_check                  # the GPU acceptance check (one CUDA GPU, ~minutes)

`attention` times forward + backward of attention.attention() for each mode on the same inputs
(B=1, H=8, D=64, group size T/4, 4 sinks) and reports the median time, the peak memory, and both as
ratios to full attention. The modes run round-robin (full, s2, sf, full, s2, sf, ...) so that a change
in the machine's load during the run hits all of them alike. The targets are printed below the table: s2 at least 3x faster than full at T=8192, sf within 1.15x of s2, no mode above full in memory.
"""
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time

import torch

from attention import attention
from longlora.cli import MAX_CTX, Parser, UsageError, entry, integer

MODES = ("full", "s2", "sf")


# ----------------------------------------------------------------------------- attention

def _step(q, k, v, grad_out, mode, backend):
    """One forward + backward; gradients are dropped first so that no run accumulates into another."""
    for t in (q, k, v):
        t.grad = None
    out = attention(q, k, v, mode, backend=backend)
    out.backward(grad_out)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _peak_alloc_bytes(fn, cuda: bool):
    """Peak bytes of tensors allocated while fn() runs, above what existed before it.

    On CUDA this is the caching allocator's own max_memory_allocated. On the CPU we replay the step
    under torch.profiler(profile_memory=True) and take the running maximum of the allocator's "Total
    Allocated" over every allocation and free it records; this counts every tensor, including the fused
    kernels' scratch buffers, and nothing else. (Process RSS, e.g. ru_maxrss in a fresh subprocess, was
    the other candidate; it also counts what glibc keeps after a free, and measured full attention at
    T=8192 fp32 as 106 MB against 66 MB of tensors actually alive, so it would blur the comparison.)
    """
    if cuda:
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = [e["args"] for e in json.load(f)["traceEvents"] if e.get("name") == "[memory]"]
    if not events:
        return 0
    start = events[0]["Total Allocated"] - events[0]["Bytes"]  # allocated just before the first event
    return max(e["Total Allocated"] for e in events) - start


def _peak_bytes(q, k, v, grad_out, mode, backend):
    """Peak bytes of one forward + backward of attention. The inputs q, k, v and grad_out exist before the
    step and are not counted; the gradients of q, k, v and the output are, for every mode alike."""
    for t in (q, k, v):
        t.grad = None
    return _peak_alloc_bytes(lambda: _step(q, k, v, grad_out, mode, backend), q.device.type == "cuda")


def bench_attention(args):
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda but CUDA is not available")
    Ts = [1024, 2048] if args.quick else args.T
    if args.threads:
        torch.set_num_threads(args.threads)
    B, H, D = 1, 8, 64
    print(f"attention forward+backward, B={B} H={H} D={D}, group size T/4, sf with 4 sinks, backend {args.backend}, "
          f"{device.type}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"time: median of {args.repeats} runs after one warm-up (wall clock, and CPU seconds of this process, which "
          f"other jobs on the machine disturb far less); memory: peak of tensors allocated during one forward+backward "
          f"(see _peak_bytes)")
    # wall-clock times on a shared machine depend on what else runs: say how busy it was
    print(f"load average at start: {os.getloadavg()[0]:.2f} (cores: {os.cpu_count()})\n")
    print("| dtype | T | mode | time (ms) | speed-up vs full | CPU time (ms) | CPU speed-up | peak memory (MiB) | "
          "memory vs full |")
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    results = {}
    for dtype_name in args.dtype:
        dtype = getattr(torch, dtype_name)
        for T in Ts:
            gen = torch.Generator(device="cpu").manual_seed(0)
            q, k, v = (torch.randn(B, T, H, D, generator=gen).to(device, dtype).requires_grad_() for _ in range(3))
            grad_out = torch.randn(B, T, H, D, generator=gen).to(device, dtype)
            times, cpu = {mode: [] for mode in MODES}, {mode: [] for mode in MODES}
            for mode in MODES:  # warm-up (first-call allocations, kernel selection)
                _step(q, k, v, grad_out, mode, args.backend)
            for _ in range(args.repeats):
                for mode in MODES:  # round-robin, see the module docstring
                    _sync(device)
                    t0, c0 = time.perf_counter(), time.process_time()
                    _step(q, k, v, grad_out, mode, args.backend)
                    _sync(device)
                    times[mode].append(time.perf_counter() - t0)
                    cpu[mode].append(time.process_time() - c0)
            for mode in MODES:
                results[dtype_name, T, mode] = (statistics.median(times[mode]), statistics.median(cpu[mode]),
                                                _peak_bytes(q, k, v, grad_out, mode, args.backend))
            t_full, c_full, m_full = results[dtype_name, T, "full"]
            for mode in MODES:
                t, c, m = results[dtype_name, T, mode]
                print(f"| {dtype_name} | {T} | {mode} | {t * 1e3:.0f} | {t_full / t:.2f}x | {c * 1e3:.0f} | "
                      f"{c_full / c:.2f}x | {m / 2**20:.1f} | {m / m_full:.2f}x |", flush=True)
            del q, k, v, grad_out

    print(f"\nload average at end: {os.getloadavg()[0]:.2f}")
    print("targets (on wall-clock time; the same ratios on CPU time in brackets):")
    for dtype_name in args.dtype:
        for T in Ts:
            (tf, cf, mf), (t2, c2, m2), (tsf, csf, msf) = (results[dtype_name, T, mode] for mode in MODES)
            checks = [f"s2 {tf / t2:.2f}x [{cf / c2:.2f}x] faster than full" + (" (target >= 3x)" if T == 8192 else ""),
                      f"sf / s2 time {tsf / t2:.2f} [{csf / c2:.2f}] (target <= 1.15)",
                      f"memory vs full: s2 {m2 / mf:.2f}, sf {msf / mf:.2f} (target <= 1)"]
            ok = (tf / t2 >= 3 or T != 8192) and tsf / t2 <= 1.15 and max(m2, msf) <= mf
            print(f"  {dtype_name} T={T}: {'; '.join(checks)} -> {'met' if ok else 'MISSED'}")


# ----------------------------------------------------------------------------- train, sample

def _peer_model(ours, mode):
    """HF transformers' LlamaForCausalLM + PEFT LoRA with our model's weights, shapes and LoRA (r, alpha,
    targets), trainable embeddings and norms set the way LongLoRA's fine-tune.py does (requires_grad on the
    base tensors, not PEFT's modules_to_save copies), gradient checkpointing on. For s2/sf its attention
    calls attention.attention through transformers' AttentionInterface: the same attention for both."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    from longlora.export import PEFT_TARGETS, peft_adapter
    from longlora.weights import hf_config, meta_to_hf_state

    def ours_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        # HF hands over (B, H, T, D) after RoPE and wants (B, T, H, D) back; no padding in this benchmark
        out = attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), mode)  # (B, T, H, D)
        return out, None

    transformers.AttentionInterface.register("longlora_" + mode, ours_attention)
    transformers.AttentionMaskInterface.register("longlora_" + mode, lambda *a, **k: None)  # never used
    cfg = hf_config(ours.args, torch.float32)
    cfg.pop("architectures")
    cfg.pop("model_type")
    config = transformers.LlamaConfig(**cfg)
    config._attn_implementation = "sdpa" if mode == "full" else "longlora_" + mode
    with torch.device("meta"):
        peer = transformers.LlamaForCausalLM(config)
    base = {k: v.clone() for k, v in ours.state_dict().items() if not k.endswith((".lora_a", ".lora_b"))}  # own copies
    peer.load_state_dict(meta_to_hf_state(ours.args, base), strict=True, assign=True)
    peer.model.rotary_emb = type(peer.model.rotary_emb)(config)  # its inv_freq buffer was on meta
    lc = ours.lora_config
    peer = get_peft_model(peer, LoraConfig(r=lc["r"], lora_alpha=lc["alpha"], lora_dropout=lc["dropout"], bias="none",
                                           target_modules=[PEFT_TARGETS[t] for t in lc["targets"]]))
    _, tensors = peft_adapter(ours)
    lora_tensors = {k: v for k, v in tensors.items() if ".lora_" in k}
    result = set_peft_model_state_dict(peer, lora_tensors)
    assert not [k for k in result.unexpected_keys], result.unexpected_keys
    for n, p in peer.named_parameters():
        if "embed_tokens" in n or "norm" in n:
            p.requires_grad_(True)
    peer.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    peer.train()
    return peer


def _ours_model(preset_name, T, mode):
    """train.py's model for ctx T: RoPE scaled by ceil(T / original context), LoRA r=8 on wq wk wv wo with a
    LoRA B that has trained a little (so that its path is not all zeros), embeddings and norms trainable,
    activation checkpointing, train mode."""
    from lora import apply_lora, mark_trainable
    from model import Transformer, preset

    torch.manual_seed(0)
    margs = preset(preset_name, attn=mode)
    margs.extend_context(T)  # position interpolation, as train.py sets it
    m = Transformer(margs)
    apply_lora(m)
    mark_trainable(m)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.endswith("lora_b"):
                p.normal_(0, 0.02, generator=torch.Generator().manual_seed(2))
    m.lean = m.gradient_checkpointing = True  # as train.py trains
    m.train()
    return m


def bench_train(args):
    """One training step (forward, backward, AdamW) of train.py's recipe for each attention mode, and the same
    step in HF transformers + PEFT as the peer; tokens/s and peak memory."""
    import torch.nn.functional as F

    from model import preset
    from train import token_loss_sum

    if args.threads:
        torch.set_num_threads(args.threads)
    T = args.ctx
    torch.manual_seed(0)
    base_args = preset(args.preset)
    x = torch.randint(0, base_args.vocab_size, (args.batch_size, T + 1), generator=torch.Generator().manual_seed(1))
    x, y = x[:, :-1], x[:, 1:]  # (B, T) each
    nograd = torch.autocast("cpu", enabled=False)
    variants = {}
    for mode in MODES:
        m = _ours_model(args.preset, T, mode)
        variants["ours", mode] = (m, lambda m: token_loss_sum(m, x, y, None, nograd))
        if not args.no_peer:
            peer = _peer_model(m, mode)
            variants["peer", mode] = (peer, lambda p: F.cross_entropy(p(input_ids=x).logits.float().flatten(0, 1),
                                                                    y.flatten(), reduction="sum"))
    opts = {k: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-5) for k, (m, _) in variants.items()}

    def step(key):
        m, loss_fn = variants[key]
        loss = loss_fn(m)
        (loss / y.numel()).backward()
        opts[key].step()
        opts[key].zero_grad(set_to_none=True)
        return loss.item() / y.numel()

    first = {k: step(k) for k in variants}  # warm-up; also: the same weights give the same loss
    # Wall time, and the CPU time of this process: on a machine shared with other jobs the wall time of a
    # step depends on them, its CPU time far less (with --threads 1 it is the compute itself).
    times = {k: [] for k in variants}
    cpu = {k: [] for k in variants}
    for _ in range(args.repeats):
        for k in variants:  # round-robin, see the module docstring
            t0, c0 = time.perf_counter(), time.process_time()
            step(k)
            times[k].append(time.perf_counter() - t0)
            cpu[k].append(time.process_time() - c0)
    # the memory of the device the step ran on: this bench runs on the CPU even where CUDA exists
    peaks = {k: _peak_alloc_bytes(lambda: step(k), x.device.type == "cuda") for k in variants}
    tokens = args.batch_size * T
    scaling = variants["ours", "full"][0].args.rope_scaling
    print(f"train step (forward + backward + AdamW), preset {args.preset}, batch {args.batch_size} x ctx {T} "
          f"(RoPE scaling {scaling:g}), LoRA r=8 alpha=16 on wq wk wv wo + embeddings and norms, activation "
          f"checkpointing, fp32, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"time: median of {args.repeats} steps after one warm-up, run round-robin; CPU: this process's CPU seconds "
          f"per step; memory: peak of tensors allocated during one step (see _peak_alloc_bytes)\n")
    print("| implementation | attention | loss at step 1 | time (s) | tokens/s | vs ours full | CPU s | tokens/CPU-s | "
          "vs ours full (CPU) | peak memory (MiB) |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    tps = {k: tokens / statistics.median(v) for k, v in times.items()}
    tpc = {k: tokens / statistics.median(v) for k, v in cpu.items()}
    for k in variants:
        name = "ours (train.py)" if k[0] == "ours" else "HF transformers + PEFT"
        print(f"| {name} | {k[1]} | {first[k]:.5f} | {statistics.median(times[k]):.2f} | {tps[k]:,.0f} | "
              f"{tps[k] / tps['ours', 'full']:.2f}x | {statistics.median(cpu[k]):.2f} | {tpc[k]:,.0f} | "
              f"{tpc[k] / tpc['ours', 'full']:.2f}x | {peaks[k] / 2**20:.0f} |")
    print("\ntargets (wall-clock tokens/s; CPU-time tokens/s in brackets):")
    r, rc = tps["ours", "s2"] / tps["ours", "full"], tpc["ours", "s2"] / tpc["ours", "full"]
    print(f"  s2 / full {r:.2f} [{rc:.2f}] (target >= 1.5) -> {'met' if r >= 1.5 else 'MISSED'}")
    if not args.no_peer:
        for mode in MODES:
            r, rc = tps["ours", mode] / tps["peer", mode], tpc["ours", mode] / tpc["peer", mode]
            same = abs(first["ours", mode] - first["peer", mode]) < 1e-4
            print(f"  {mode}: ours / peer {r:.2f} [{rc:.2f}] (target >= 1) -> {'met' if r >= 1 else 'MISSED'}; "
                  f"same loss at step 1: {'yes' if same else 'NO'}")


@contextlib.contextmanager
def feed_forward_chunks(n):
    """memory.FFN_CHUNK_SIZE = n (0: the whole sequence) for a while."""
    from longlora import memory

    saved, memory.FFN_CHUNK_SIZE = memory.FFN_CHUNK_SIZE, n
    try:
        yield
    finally:
        memory.FFN_CHUNK_SIZE = saved


def bench_chunking(args):
    """Peak memory of one training step at LLaMA2's vocabulary (32000) and a long context: the loss over whole
    (T, V) logits and the feed-forward over the whole sequence, against both in chunks of memory.CHUNK_SIZE
    tokens (longlora/memory.py). The model is the demo preset with vocab 32000, so that the loss
    is the step's largest term, as it is for LLaMA2 at long context."""
    import torch.nn.functional as F

    from longlora.memory import CHUNK_SIZE
    from lora import apply_lora, mark_trainable
    from model import Transformer, preset

    if args.threads:
        torch.set_num_threads(args.threads)
    T = args.chunk_ctx
    base_args = preset(args.preset, vocab_size=32000)
    base_args.extend_context(T)  # position interpolation, as train.py sets it
    scaling = base_args.rope_scaling
    x = torch.randint(0, 32000, (args.batch_size, T + 1), generator=torch.Generator().manual_seed(1))
    x, y = x[:, :-1], x[:, 1:]  # (B, T) each
    whole_loss = lambda m: F.cross_entropy(m(x).float().flatten(0, 1), y.flatten(), reduction="sum")  # noqa: E731
    chunked_loss = lambda m: m(x, y, reduction="sum")  # noqa: E731
    variants = {"whole loss, whole feed-forward": (whole_loss, 0), "chunked loss, whole feed-forward": (chunked_loss, 0),
                "chunked loss and feed-forward": (chunked_loss, CHUNK_SIZE)}
    models, opts = {}, {}
    for name, (_, ffn_chunk) in variants.items():
        torch.manual_seed(0)  # the same weights for every variant: the same loss at step 1
        m = models[name] = Transformer(preset(args.preset, vocab_size=32000, rope_scaling=scaling, max_seq_len=T))
        apply_lora(m)
        mark_trainable(m)
        m.lean = m.gradient_checkpointing = True
        m.train()
        opts[name] = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-5)

    def step(name):
        with feed_forward_chunks(variants[name][1]):
            loss = variants[name][0](models[name])
            (loss / y.numel()).backward()
        opts[name].step()
        opts[name].zero_grad(set_to_none=True)
        return loss.item() / y.numel()

    losses, times, peaks = {}, {}, {}
    for name in variants:
        losses[name] = step(name)  # warm-up: AdamW's state is allocated here, outside the measured steps
        t0 = time.perf_counter()
        step(name)
        times[name] = time.perf_counter() - t0
        peaks[name] = _peak_alloc_bytes(lambda: step(name), False)
    print(f"\ntrain step at LLaMA2's vocabulary (forward + backward + AdamW), preset {args.preset} with vocab 32000, "
          f"batch {args.batch_size} x ctx {T}, chunks of {CHUNK_SIZE} tokens, LoRA r=8 on wq wk wv wo + embeddings "
          f"and norms, activation checkpointing, fp32, {torch.get_num_threads()} threads, load average "
          f"{os.getloadavg()[0]:.1f}; memory: peak of tensors allocated during one step (see _peak_alloc_bytes); "
          f"time: one step after one warm-up\n")
    print("| loss / feed-forward | loss at step 1 | time (s) | peak memory (MiB) | memory vs whole |")
    print("| --- | ---: | ---: | ---: | ---: |")
    whole = peaks["whole loss, whole feed-forward"]
    for name in variants:
        print(f"| {name} | {losses[name]:.5f} | {times[name]:.2f} | {peaks[name] / 2**20:.0f} | {peaks[name] / whole:.2f}x |")
    r = whole / peaks["chunked loss, whole feed-forward"]
    print(f"\ntarget: the chunked loss needs {r:.1f}x less memory than the whole loss (target >= 3x) -> "
          f"{'met' if r >= 3 else 'MISSED'}")

    # Above, the loss's chunk is the peak either way. The feed-forward's share shows where it is the widest
    # tensor of a recomputed block: a small vocabulary and a 4x wider FFN (hidden 2048, LLaMA2's 2.7x dim).
    ffn_peaks = {}
    for ffn_chunk in (0, CHUNK_SIZE):
        torch.manual_seed(0)
        m = Transformer(preset(args.preset, vocab_size=256, ffn_hidden_dim=2048, rope_scaling=scaling, max_seq_len=T))
        m.lean = m.gradient_checkpointing = True
        m.train()
        xs = x % 256

        def full_step():
            m.zero_grad(set_to_none=True)
            with feed_forward_chunks(ffn_chunk):
                m(xs, y % 256).backward()

        full_step()
        ffn_peaks[ffn_chunk] = _peak_alloc_bytes(full_step, False)
    whole, chunked = ffn_peaks[0], ffn_peaks[CHUNK_SIZE]
    print(f"feed-forward: forward + backward of preset {args.preset} with FFN hidden 2048 and vocab 256, all weights "
          f"trained, chunked loss: peak {whole / 2**20:.0f} MiB whole, {chunked / 2**20:.0f} MiB in chunks of "
          f"{CHUNK_SIZE} ({whole / chunked:.1f}x less)")


def _hf_and_ours(preset_name):
    """An HF LlamaForCausalLM of the preset's shape (room for 1024 positions, no EOS, weights spread so that
    greedy choices are clear-cut), and the same weights loaded into ours through save_pretrained."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    from model import Transformer, preset

    a = preset(preset_name, max_seq_len=1024)  # room for 32 + 256 tokens
    cfg = transformers.LlamaConfig(
        hidden_size=a.dim, intermediate_size=a.hidden_dim, num_hidden_layers=a.n_layers,
        num_attention_heads=a.n_heads, num_key_value_heads=a.n_kv_heads, vocab_size=a.vocab_size,
        max_position_embeddings=a.max_seq_len, rms_norm_eps=a.norm_eps, tie_word_embeddings=False,
        bos_token_id=None, eos_token_id=None, pad_token_id=None)  # no EOS: both generate every token
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # HF's init gives near-uniform logits; spread them so greedy choices are clear-cut
        for pname, p in hf.named_parameters():
            p.copy_(1 + 0.3 * torch.randn_like(p) if "norm" in pname else 0.2 * torch.randn_like(p))
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        ours = Transformer.from_pretrained(d).eval()
    return hf, ours


def bench_sample(args):
    """Generation speed of sample.py, greedy, one sequence:

      1. decode tokens/s with the full KV cache vs recomputing the whole sequence for every new token,
         after a 2048-token prompt (model preset demo);
      2. H₂O at a 20% budget (10% heavy + 10% recent) vs the full KV cache after a --long-token prompt:
         prefill time, decode tokens/s, and the size of the cache at the end;
      3. ours vs HF transformers' `generate` on the same weights (an HF LlamaForCausalLM saved with
         save_pretrained and loaded by Transformer.from_pretrained), prompt 32 + 256 new tokens, end to end.
    Variants run round-robin, --repeats times; the best run counts (the machine's other load only slows).
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    from model import Transformer, preset
    from sample import generate

    if args.threads:
        torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)

    def run_generate(model, prompt, n, **kw):
        """(prefill seconds, decode tokens/s, tokens, KV cache MiB) of one sample.generate call."""
        stats = {}
        out = list(generate(model, prompt, n, **kw, stats=stats))
        return stats["prefill_seconds"], stats["decode_tokens"] / stats["decode_seconds"], out, stats["kv_cache_bytes"] / 2**20

    @torch.inference_mode()
    def recompute(model, prompt, n):
        ids = list(prompt)
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
        return ids[len(prompt):]

    def best_of(fns):
        """Run each fn round-robin args.repeats times; per fn the fastest (seconds, result)."""
        best = {}
        for _ in range(args.repeats):
            for name, fn in fns.items():
                t0 = time.perf_counter()
                result = fn()
                dt = time.perf_counter() - t0
                if name not in best or dt < best[name][0]:
                    best[name] = (dt, result)
        return best

    print(f"sample.py generation, greedy, batch 1, fp32, cpu, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"transformers {transformers.__version__}; best of {args.repeats} runs, variants round-robin; machine load "
          f"average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores at the start (more threads than idle cores "
          f"make small-model decoding wait on descheduled threads: try --threads 1)\n")
    torch.manual_seed(0)
    demo = Transformer(preset("demo", max_seq_len=2 * args.long)).eval()

    # 1. the KV cache vs recomputation
    prompt = torch.randint(0, demo.args.vocab_size, (2048,), generator=g).tolist()
    n = 8  # recomputation is slow: 8 tokens; the cache decodes 64 (more steps, steadier rate)
    best = best_of({"cache": lambda: run_generate(demo, prompt, 64),
                    "recompute": lambda: recompute(demo, prompt, n)})
    _, cached_tps, out_c, _ = best["cache"][1]
    recompute_tps = n / best["recompute"][0]  # every token costs a forward over the whole sequence
    print("| demo preset, prompt 2048 | decode tokens/s | vs recomputation | same tokens |")
    print("| --- | ---: | ---: | --- |")
    print(f"| full KV cache | {cached_tps:.1f} | {cached_tps / recompute_tps:.1f}x | {out_c[:n] == best['recompute'][1]} |")
    print(f"| recompute every step | {recompute_tps:.2f} | 1.0x | |\n")

    # 2. H₂O at 20% vs the full cache after a long prompt
    prompt = torch.randint(0, demo.args.vocab_size, (args.long,), generator=g).tolist()
    n = 64
    best = best_of({"full": lambda: run_generate(demo, prompt, n, prefill_chunk=512),
                    "h2o": lambda: run_generate(demo, prompt, n, cache="h2o", heavy=0.1, recent=0.1, prefill_chunk=512)})
    print(f"| demo preset, prompt {args.long}, {n} new | prefill (s) | decode tokens/s | decode vs full | KV cache (MiB) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    full_tps = best["full"][1][1]
    for name in ("full", "h2o"):
        prefill, tps, _, mib = best[name][1]
        label = "full KV cache" if name == "full" else "h2o, 10% heavy + 10% recent"
        print(f"| {label} | {prefill:.2f} | {tps:.1f} | {tps / full_tps:.2f}x | {mib:.1f} |")
    print()

    # 3. ours vs HF transformers' generate, same weights
    print("| model | prompt + new | ours tokens/s | HF generate tokens/s | ours / HF | same tokens |")
    print("| --- | --- | ---: | ---: | ---: | --- |")
    ratios = {}
    for name in ("tiny", "demo"):
        hf, ours = _hf_and_ours(name)
        a = ours.args
        prompt = torch.randint(0, a.vocab_size, (32,), generator=g).tolist()
        n = 256
        ids = torch.tensor([prompt])

        def hf_generate():
            with torch.inference_mode():
                out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)
            return out[0, len(prompt):].tolist()

        best = best_of({"ours": lambda: list(generate(ours, prompt, n)), "hf": hf_generate})
        (t_ours, out_o), (t_hf, out_h) = best["ours"], best["hf"]
        ratios[name] = t_hf / t_ours
        print(f"| {name} ({ours.num_params() / 1e6:.2f}M) | 32 + {n} | {n / t_ours:.1f} | {n / t_hf:.1f} | "
              f"{ratios[name]:.2f}x | {out_o == out_h} |")
    print("\ntargets:")
    for name, r in ratios.items():
        target = 1.3 if name == "demo" else 1.0  # the demo preset: what a user decodes with after `python demo.py`
        print(f"  {name}: ours / HF generate tokens/s {r:.2f} (target >= {target:g}) -> {'met' if r >= target else 'MISSED'}")


# ----------------------------------------------------------------------------- command line

@entry
def main(argv=None):
    from model import PRESETS

    parser = Parser(description="Benchmarks of the project (speed targets live here, not in tests).", examples=[
        "python -m longlora.bench attention --quick", "python -m longlora.bench train --threads 1", "python -m longlora.bench sample"])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("attention", examples=["python -m longlora.bench attention --quick", "python -m longlora.bench attention --T 8192 --dtype bfloat16 --device cuda"], help="forward+backward time and peak memory of full, s2 and sf attention",
                       description="Median forward+backward time and peak memory of full, S²-Attn and SF-Attn, "
                                   "with ratios to full attention.")
    p.add_argument("--T", type=integer(8, MAX_CTX), nargs="+", default=[2048, 4096, 8192, 16384],
                   help="sequence lengths, each >= 8: group size T/4 must be even and >= 2 (default 2048 4096 8192 16384)")
    p.add_argument("--dtype", nargs="+", choices=["float32", "bfloat16", "float16"], default=["float32", "bfloat16"],
                   help="dtypes to run (default float32 bfloat16)")
    p.add_argument("--repeats", type=integer(1), default=3, help="timed runs per case after one warm-up (default 3)")
    p.add_argument("--quick", action="store_true", help="T = 1024 and 2048 only, for a check in seconds")
    p.add_argument("--backend", choices=["sdpa", "flash", "auto", "reference"], default="sdpa",
                   help="attention backend (default sdpa, the CPU fast path; flash needs CUDA and flash-attn; "
                        "reference builds T x T masks and is only for small T)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="device (default cpu)")
    p.add_argument("--threads", type=integer(0, 4096), default=0,
                   help="CPU threads for torch (default 0: torch's default, one per core); 1 gives steadier ratios "
                        "when other jobs share the machine")
    p.set_defaults(run=bench_attention)

    p = sub.add_parser("train", examples=["python -m longlora.bench train --threads 1", "python -m longlora.bench train --only chunking"], help="training step tokens/s and peak memory per attention mode, and HF + PEFT",
                       description="tokens/s and peak memory of one LoRA training step (train.py's recipe) with "
                                   "full, s2 and sf attention, and the same step in HF transformers + PEFT.")
    p.add_argument("--preset", default="demo", choices=sorted(PRESETS), help="model shape from model.py's PRESETS (default demo)")
    p.add_argument("--ctx", type=integer(1, MAX_CTX), default=4096, help="sequence length (default 4096)")
    p.add_argument("--batch-size", type=integer(1), default=1, help="sequences per step (default 1)")
    p.add_argument("--repeats", type=integer(1), default=3, help="timed steps per variant after one warm-up (default 3)")
    p.add_argument("--threads", type=integer(0, 4096), default=0, help="torch threads (default: torch's choice)")
    p.add_argument("--no-peer", action="store_true", help="skip HF transformers + PEFT")
    p.add_argument("--chunk-ctx", type=integer(1, MAX_CTX), default=8192,
                   help="sequence length of the chunked-loss case, at vocab 32000 (default 8192)")
    p.add_argument("--only", choices=["modes", "chunking"],
                   help="run one case: the attention modes (and the peer), or the chunked loss and feed-forward")
    p.set_defaults(run=lambda a: [f(a) for f, case in ((bench_train, "modes"), (bench_chunking, "chunking"))
                                  if a.only in (None, case)])
    p = sub.add_parser("sample", examples=["python -m longlora.bench sample", "python -m longlora.bench sample --long 4096 --repeats 5"], help="generation tokens/s: KV cache vs recomputation, h2o vs full, ours vs HF generate",
                       description="Decode tokens/s of sample.py: full KV cache vs recomputation, H2O at 20% vs the "
                                   "full cache at a long prompt, and ours vs HF transformers' generate on the same weights.")
    p.add_argument("--long", type=integer(1, MAX_CTX), default=8192, help="prompt length of the h2o vs full comparison (default 8192)")
    p.add_argument("--repeats", type=integer(1), default=3, help="runs per variant, round-robin; the best counts (default 3)")
    p.add_argument("--threads", type=integer(0, 4096), default=0, help="torch threads (default: torch's choice)")
    p.set_defaults(run=bench_sample)

    args = parser.parse_args(argv)
    if args.command == "attention":
        if args.backend == "flash" and (args.device == "cpu" or "float32" in args.dtype):
            raise UsageError("--backend flash runs on CUDA fp16/bf16 only: add --device cuda --dtype bfloat16")
    args.run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
