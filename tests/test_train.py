"""train.py: the step loss is the global token mean of an independent forward, FSDP equals one process, bf16
trains like fp32, resume repeats the losses, a kill during a save leaves the previous checkpoint and old
ones go only after a new one is complete (checkpoint.py), training lowers the held-out loss (full
attention), the defaults are LongLoRA's recipe, clean failures, no flag shadows torchrun's.
(Data preparation: test_data.py; --estimate: test_estimate.py.)"""

import json
import math
import re
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from conftest import ROOT, STDLIB
from attention import resolve_group_size
from longlora.checkpoint import checkpoint_dirs, find_checkpoint
from longlora.data import SFTData, open_tokens, prepare_sft, split_heldout
from lora import apply_lora, mark_trainable
from longlora import memory
from longlora.run import build_parser, parse_args
from longlora.tokenizer import Tokenizer
from model import Transformer, preset
import train

# Two ranks (FSDP, gloo) against one process, fp32 on the CPU. The sums of two ranks' gradients are
# reduced in another order than one process accumulates them; observed difference 0, allowed:
FSDP_LOSS_TOL, FSDP_WEIGHT_TOL = 1e-5, 1e-6
RESUME_TOL = 1e-6  # a resumed fp32 run repeats the uninterrupted one (observed: exactly)
BF16_LOSS_TOL = 2e-2  # bf16 compute against fp32, same data (observed ~3e-4)
BF16_UPDATE_TOL = 0.5  # |bf16 update - fp32 update| / |fp32 update| of each trainable tensor after 2 steps (observed ≤ 0.18)


def run_torchrun(args, n=2, env=None, script=os.path.join(ROOT, "train.py")):
    """train.py (or a script that runs it) under torchrun with n ranks (FSDP over gloo), as a subprocess."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", script, *args]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, **(env or {})}, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return r


def losses(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        recs = [json.loads(line) for line in f]
    return {r["step"]: r["loss"] for r in recs if "loss" in r}, {r["step"]: r["heldout_loss"] for r in recs if "heldout_loss" in r}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Real text: a folder of four standard-library modules."""
    d = tmp_path_factory.mktemp("corpus")
    for name in ("argparse.py", "dataclasses.py", "pathlib.py", "typing.py"):
        (d / name).write_text(open(os.path.join(STDLIB, name), encoding="utf-8").read(), encoding="utf-8")
    return str(d)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, sp_model):
    """A tiny random LLaMA (GQA, 128 positions) with the test tokenizer, in model.py's layout."""
    d = tmp_path_factory.mktemp("base")
    torch.manual_seed(0)
    Transformer(preset("tiny", vocab_size=512)).save_pretrained(str(d), tokenizer_path=sp_model)
    return str(d)


@pytest.fixture(scope="module")
def token_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tokens"))


def common(base_dir, corpus, token_cache, **kw):
    args = dict(model=base_dir, data=corpus, ctx=128, steps=3, batch_size=1, lr=1e-3, warmup=1, save_every=2,
                token_cache=token_cache)
    args.update(kw)
    out = []
    for k, v in args.items():
        out += [f"--{k.replace('_', '-')}", str(v)]
    return out


# ----------------------------------------------------------------------------------------------------
# FSDP, checkpoints, resume


# train.py with memory.CHUNK_SIZE 32: sequences of 128 tokens go through the loss, the feed-forward and RoPE in
# several chunks, so under FSDP the output projection, a unit of its own, is gathered for each chunk of the loss
SMALL_CHUNKS = """
import os, sys, train
from longlora import memory
memory.CHUNK_SIZE = 32
os._exit(train.main(sys.argv[1:]))  # as train.py does under torchrun (longlora.run.exit_process)
"""


def test_two_fsdp_ranks_equal_one_process_and_resume_under_fsdp(base_dir, corpus, token_cache, tmp_path, monkeypatch):
    one, two, resumed = (str(tmp_path / n) for n in ("one", "two", "resumed"))
    monkeypatch.setattr(memory, "CHUNK_SIZE", 32)
    (tmp_path / "small_chunks.py").write_text(f"import sys\nsys.path.insert(0, {ROOT!r})\n" + SMALL_CHUNKS)
    script = str(tmp_path / "small_chunks.py")
    # the same global batch of 4 sequences: 1 process x 4 micro-batches, or 2 ranks x 2 (FSDP reduces the
    # gradients after the second only); --eval-every 2: a held-out evaluation (forward only) right before
    # the step-2 checkpoint is saved
    assert train.main(common(base_dir, corpus, token_cache, grad_accum=4, eval_every=2, out=one)) == 0
    run_torchrun(common(base_dir, corpus, token_cache, grad_accum=2, eval_every=2, out=two), script=script)
    l1, h1 = losses(one)
    l2, h2 = losses(two)
    assert sorted(l1) == sorted(l2) == [1, 2, 3]
    for s in l1:
        assert abs(l1[s] - l2[s]) <= FSDP_LOSS_TOL, (s, l1[s], l2[s])
    assert abs(h1[3] - h2[3]) <= FSDP_LOSS_TOL
    a1, a2 = load_file(os.path.join(one, "adapter.safetensors")), load_file(os.path.join(two, "adapter.safetensors"))
    assert a1.keys() == a2.keys()
    base = Transformer.from_pretrained(base_dir)
    for k in a1:
        assert torch.allclose(a1[k], a2[k], atol=FSDP_WEIGHT_TOL, rtol=0), k
    assert not torch.equal(a1["tok_embeddings.weight"], base.tok_embeddings.weight)  # it did train
    # resume the 2-rank run from its step-2 checkpoint, 2 ranks again (rank 0 reads, FSDP broadcasts)
    run_torchrun(common(base_dir, corpus, token_cache, grad_accum=2, out=resumed,
                        resume=os.path.join(two, "checkpoints", "step-000002")), script=script)
    l3, _ = losses(resumed)
    assert list(l3) == [3] and abs(l3[3] - l2[3]) <= RESUME_TOL
    a3 = load_file(os.path.join(resumed, "adapter.safetensors"))
    for k in a2:
        assert torch.allclose(a2[k], a3[k], atol=RESUME_TOL, rtol=0), k


def test_sft_loss_is_the_global_token_mean_on_one_process_and_on_two_ranks(base_dir, tmp_path):
    """SFT rows have different lengths and answer sizes; the step's loss is a mean over all answer tokens of
    the global batch, so splitting it over ranks (each padding its own rows) changes nothing."""
    doc = open(os.path.join(STDLIB, "bisect.py")).read()
    recs = [{"instruction": f"Quote part {i} of bisect.py.", "input": doc[i * 97:i * 97 + 40 * (i % 5 + 1)],
             "output": doc[i * 53:i * 53 + 30 * (i % 7 + 1)]} for i in range(16)]
    data = tmp_path / "sft.json"
    data.write_text(json.dumps(recs))
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    args = common(base_dir, str(data), str(tmp_path / "tok"), ctx=256, steps=2, batch_size=2, heldout=0.1) + ["--sft"]
    assert train.main(args + ["--grad-accum", "2", "--out", one]) == 0
    run_torchrun(args + ["--grad-accum", "1", "--out", two])
    (l1, h1), (l2, h2) = losses(one), losses(two)
    assert sorted(l1) == sorted(l2) == [1, 2]
    for s in l1:
        assert abs(l1[s] - l2[s]) <= FSDP_LOSS_TOL, (s, l1[s], l2[s])
    assert abs(h1[2] - h2[2]) <= FSDP_LOSS_TOL


@pytest.mark.parametrize("rule", ["official", "quarter"])
def test_sft_attention_groups_follow_the_chosen_rule(rule, base_dir, tmp_path, monkeypatch):
    """official (the default): LongLoRA's SFT rule applied to the token count of the batch's longest example,
    truncated at ctx (one example here is longer than ctx), which gives 8192 > T here, so the plain heads see whole
    rows; quarter: T/4 of the padded batch."""
    import model as model_py

    seen, attention = [], model_py.attention
    monkeypatch.setattr(model_py, "attention", lambda q, k, v, mode, **kw: seen.append((mode, q.shape[1], kw["group_size"]))
                        or attention(q, k, v, mode, **kw))
    ruled, expected, rule_of, batch = [], [], train.longlora_sft_group_size, SFTData.batch
    monkeypatch.setattr(train, "longlora_sft_group_size", lambda n: ruled.append(n) or rule_of(n))
    # the longest example of each batch, from the index: its whole length, truncated at ctx
    monkeypatch.setattr(SFTData, "batch", lambda self, positions: expected.append(
        min(max(int(self.index[self.ids[p], 2]) for p in positions), self.ctx)) or batch(self, positions))
    doc = open(os.path.join(STDLIB, "bisect.py")).read()
    recs = [{"instruction": f"Quote part {i}.", "output": doc[i * 53:i * 53 + 40 * (i + 1)]} for i in range(3)]
    recs.append({"instruction": "Quote all of it.", "output": doc[:3000]})  # more than ctx tokens
    (tmp_path / "sft.json").write_text(json.dumps(recs))
    args = common(base_dir, str(tmp_path / "sft.json"), str(tmp_path / "tok"), ctx=256, steps=2, batch_size=2,
                  grad_accum=1, heldout=0, out=str(tmp_path / "out"), sft_group_size=rule) + ["--sft"]
    assert train.main(args) == 0
    groups = [(T, g) for mode, T, g in seen if mode == "s2"]
    assert groups and all(g == (8192 if rule == "official" else None) for _, g in groups), groups
    assert ruled == (expected if rule == "official" else []) and 256 in expected


def test_step_loss_and_gradient_are_the_global_token_mean_of_an_independent_forward(base_dir, sp_model, tmp_path):
    """One step over 4 SFT rows of very different answer lengths (2 micro-batches of 2): the logged loss
    and the logged (pre-clip) gradient norm are those of sum(cross-entropy over all answer tokens) / their
    number, computed here by a plain forward and backward of each row alone, without train.py's loop, on the
    base with the position interpolation --ctx implies. A mean of per-micro-batch means weighs the tokens of
    the short answers more, and differs."""
    doc = open(os.path.join(STDLIB, "bisect.py")).read()
    recs = [{"instruction": f"Quote part {i}.", "output": doc[300 * i:300 * i + n]} for i, n in enumerate((8, 200, 20, 120))]
    data = tmp_path / "sft.json"
    data.write_text(json.dumps(recs))
    out = str(tmp_path / "run")
    argv = ["--model", base_dir, "--data", str(data), "--sft", "--ctx", "256", "--attn", "full", "--heldout", "0",
            "--steps", "1", "--batch-size", "2", "--grad-accum", "2", "--lr", "1e-3", "--out", out]
    assert train.main(argv) == 0
    with open(os.path.join(out, "metrics.jsonl")) as f:
        logged = [json.loads(line) for line in f][0]
    # the same rows, each alone (step 1 of 4 rows x 1 epoch sees every row once, in some order)
    tok = Tokenizer(sp_model)
    tokens, index = prepare_sft([str(data)], tok, str(tmp_path / "sft.bin"))
    rows = [SFTData(tokens, index, 256, 8, tok.eos_id).batch([i]) for i in range(4)]
    torch.manual_seed(0)  # train.py's LoRA init: --seed 0, then the same calls
    # --ctx 256 on a base of 128 positions: position interpolation by ceil(256 / 128) = 2
    model = Transformer.from_pretrained(base_dir, rope_scaling=2.0, max_seq_len=256)
    apply_lora(model)
    mark_trainable(model)
    n_answer = sum(int((y != -100).sum()) for _, y, _ in rows)
    assert len({int((y != -100).sum()) for _, y, _ in rows}) == 4  # answer lengths differ: the weighting matters
    loss = sum(F.cross_entropy(model(x)[0], y[0], ignore_index=-100, reduction="sum") for x, y, _ in rows) / n_answer
    loss.backward()
    grad_norm = torch.sqrt(sum((p.grad ** 2).sum() for p in model.parameters() if p.requires_grad)).item()
    assert abs(logged["loss"] - loss.item()) <= 1e-5, (logged["loss"], loss.item())
    assert abs(logged["grad_norm"] - grad_norm) <= 1e-4 * grad_norm, (logged["grad_norm"], grad_norm)
    # the LoRA A matrices match train.py's init (their gradient is 0 while B is 0, so step 1 keeps them)
    trained = load_file(os.path.join(out, "adapter.safetensors"))
    assert torch.equal(trained["layers.0.attention.wq.lora_a"], model.layers[0].attention.wq.lora_a.detach())
    cfg = json.load(open(os.path.join(out, "adapter_config.json")))
    assert (cfg["rope_scaling"], cfg["max_seq_len"]) == (2.0, 256)


# train.py under torchrun, each rank comparing its shard of every frozen parameter after training with the
# one it started with; each rank writes the names that changed into a file of its own (printed lines of two
# ranks can interleave)
FROZEN_WATCH = """
import os, sys, torch, train
build, start = train.build_model, {}
def watched_build(*args, **kwargs):
    model, *rest = build(*args, **kwargs)
    start.update({n: p.to_local().clone() for n, p in model.named_parameters() if not p.requires_grad}, model=model)
    return (model, *rest)
train.build_model = watched_build
code = train.main(sys.argv[1:])
end = {n: p.to_local() for n, p in start.pop("model").named_parameters() if not p.requires_grad}
out = sys.argv[sys.argv.index("--out") + 1]
with open(f"{out}.frozen-rank{os.environ['RANK']}.txt", "w") as f:
    f.write(f"{len(start)} frozen parameters, changed: {[n for n in start if not torch.equal(end[n], start[n])]}")
os._exit(code)  # as train.py does under torchrun (longlora.run.exit_process)
"""


def test_bf16_fsdp_trains_fp32_copies_of_only_the_trainable_tensors(base_dir, corpus, token_cache, tmp_path):
    # GPU recipe on the CPU: frozen base in bf16, trainable tensors fp32, bf16 compute / fp32 reduction.
    ref, out = str(tmp_path / "fp32"), str(tmp_path / "bf16")
    assert train.main(common(base_dir, corpus, token_cache, grad_accum=2, steps=2, out=ref)) == 0
    (tmp_path / "watch.py").write_text(f"import sys\nsys.path.insert(0, {ROOT!r})\n" + FROZEN_WATCH)
    run_torchrun(common(base_dir, corpus, token_cache, grad_accum=1, steps=2, dtype="bf16", eval_every=1, out=out),
                 script=str(tmp_path / "watch.py"))
    optim = torch.load(os.path.join(out, "checkpoints", "step-000002", "optimizer.pt"), weights_only=True)
    base = Transformer.from_pretrained(base_dir)
    apply_lora(base)
    mark_trainable(base)
    trainable = {n for n, p in base.named_parameters() if p.requires_grad}
    assert set(optim["state"]) == trainable  # no optimizer state for the frozen base
    frozen = {n for n, p in base.named_parameters() if not p.requires_grad}
    for rank in (0, 1):
        assert (tmp_path / f"bf16.frozen-rank{rank}.txt").read_text() == f"{len(frozen)} frozen parameters, changed: []"
    for state in optim["state"].values():
        assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.float32
    adapter = load_file(os.path.join(out, "adapter.safetensors"))
    assert all(t.dtype == torch.float32 for t in adapter.values())
    # the adapter holds the fp32 masters, not bf16 compute copies left behind by the final evaluation
    masters = load_file(os.path.join(out, "checkpoints", "step-000002", "trainable.safetensors"))
    for k, t in adapter.items():
        assert torch.equal(t, masters[k]), k
    (l_ref, _), (l_bf16, _) = losses(ref), losses(out)
    for s in l_ref:
        assert abs(l_ref[s] - l_bf16[s]) <= BF16_LOSS_TOL
    # it trained, as the fp32 run did: every trainable tensor moved from its start (LoRA B from 0, the rest
    # from the base) in the fp32 run's direction; the frozen ones stayed (above)
    fp32 = load_file(os.path.join(ref, "adapter.safetensors"))
    assert adapter.keys() == fp32.keys() == trainable
    start = {k: torch.zeros_like(t) if k.endswith("lora_b") else base.state_dict()[k] for k, t in fp32.items()
             if not k.endswith("lora_a")}  # (A starts random; its first update comes at step 2, once B is not 0)
    for k, t0 in start.items():
        moved, moved_fp32 = adapter[k] - t0, fp32[k] - t0
        assert moved_fp32.norm() > 0 and (moved - moved_fp32).norm() <= BF16_UPDATE_TOL * moved_fp32.norm(), k


def test_bf16_in_one_process_computes_in_bf16_with_a_bf16_base_and_fp32_trainable_tensors(base_dir, corpus, token_cache,
                                                                                          tmp_path, monkeypatch):
    """--dtype bf16 without torchrun: the frozen base is stored in bf16, the trainable tensors in fp32, and the
    forward runs under autocast, so the matrix products (here: the output layer's) compute in bf16."""
    seen = {}
    build = train.build_model

    def spy_build(*args, **kwargs):
        built = build(*args, **kwargs)
        model = built[0]
        seen["dtypes"] = {n: (p.dtype, p.requires_grad) for n, p in model.named_parameters()}
        model.output.register_forward_hook(lambda m, i, o: seen.update(output=o.dtype))  # returns None: o stays
        return built

    monkeypatch.setattr(train, "build_model", spy_build)
    out = str(tmp_path / "run")
    assert train.main(common(base_dir, corpus, token_cache, steps=1, grad_accum=1, dtype="bf16", out=out)) == 0
    assert seen["output"] == torch.bfloat16
    assert all(dtype == (torch.float32 if trains else torch.bfloat16) for dtype, trains in seen["dtypes"].values())
    assert {t.dtype for t in load_file(os.path.join(out, "adapter.safetensors")).values()} == {torch.float32}


@pytest.fixture(scope="module")
def hf_base(tmp_path_factory, sp_model):
    """A tiny random LLaMA written by transformers itself (64 positions, so ctx 128 scales RoPE by 2)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    d = tmp_path_factory.mktemp("hf_base")
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=512, max_position_embeddings=64, rms_norm_eps=1e-5)
    LlamaForCausalLM(cfg).save_pretrained(str(d))
    (d / "tokenizer.model").write_bytes(open(sp_model, "rb").read())
    return str(d)


def dcp_weights(ckpt):
    """{name: full tensor} of the weights in a --full checkpoint's DCP shards, read here in one process as any tool
    would: empty tensors of the shapes .metadata records, filled by dcp.load."""
    from torch.distributed.checkpoint import FileSystemReader, load

    reader = FileSystemReader(os.path.join(ckpt, "dcp"))
    wanted = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in reader.read_metadata().state_dict_metadata.items()
              if k.startswith("model.")}
    load(wanted, storage_reader=reader, no_dist=True)
    return {k.removeprefix("model."): v for k, v in wanted.items()}


def test_full_fine_tuning_two_ranks_equal_one_process_resume_exactly_at_either_world_size_and_export_an_hf_model(
        hf_base, corpus, token_cache, tmp_path):
    """--full: every parameter trains under FSDP; HF in, HF out, RoPE scaling recorded, transformers agrees. Its
    checkpoints are DCP shards, one set per rank; resumed from step 2 by 2 ranks, by 1 process from the 2 ranks'
    checkpoint and by 2 ranks from the 1 process's (DCP reshards), step 3 repeats the uninterrupted runs."""
    from transformers import LlamaForCausalLM

    one, two, resumed, two_to_one, one_to_two = (str(tmp_path / n) for n in ("one", "two", "resumed", "2to1", "1to2"))
    step2 = lambda run: os.path.join(run, "checkpoints", "step-000002")  # noqa: E731
    assert train.main(common(hf_base, corpus, token_cache, grad_accum=2, out=one) + ["--full"]) == 0
    run_torchrun(common(hf_base, corpus, token_cache, grad_accum=1, out=two) + ["--full"])
    shards = sorted(os.listdir(os.path.join(step2(two), "dcp")))
    assert ".metadata" in shards and {n[:3] for n in shards if n.endswith(".distcp")} == {"__0", "__1"}, shards
    assert not os.path.exists(os.path.join(step2(two), "trainable.safetensors"))  # nothing gathered whole
    run_torchrun(common(hf_base, corpus, token_cache, grad_accum=1, out=resumed, resume=step2(two)) + ["--full"])
    assert train.main(common(hf_base, corpus, token_cache, grad_accum=2, out=two_to_one, resume=step2(two)) + ["--full"]) == 0
    run_torchrun(common(hf_base, corpus, token_cache, grad_accum=1, out=one_to_two, resume=step2(one)) + ["--full"])
    (l1, _), (l2, _) = losses(one), losses(two)
    assert sorted(l1) == sorted(l2) == [1, 2, 3]
    for s in l1:
        assert abs(l1[s] - l2[s]) <= FSDP_LOSS_TOL, (s, l1[s], l2[s])
    for run, uninterrupted in ((resumed, l2), (two_to_one, l2), (one_to_two, l1)):
        l3, _ = losses(run)
        assert list(l3) == [3] and abs(l3[3] - uninterrupted[3]) <= RESUME_TOL, (run, l3, uninterrupted[3])
    base = Transformer.from_pretrained(hf_base).state_dict()
    m1, m2, m3 = (Transformer.from_pretrained(d) for d in (one, two, resumed))  # strict: every tensor, no other
    for d in (one, two, resumed):
        assert os.path.exists(os.path.join(d, "config.json")) and not os.path.exists(os.path.join(d, "adapter.safetensors"))
    s1, s2, s3 = m1.state_dict(), m2.state_dict(), m3.state_dict()
    s21, s12 = Transformer.from_pretrained(two_to_one).state_dict(), Transformer.from_pretrained(one_to_two).state_dict()
    for k in base:
        assert not torch.equal(s1[k], base[k]), k  # every parameter trained
        assert torch.allclose(s1[k], s2[k], atol=FSDP_WEIGHT_TOL, rtol=0), k
        assert torch.allclose(s2[k], s3[k], atol=RESUME_TOL, rtol=0), k
        assert torch.allclose(s2[k], s21[k], atol=RESUME_TOL, rtol=0), k
        assert torch.allclose(s1[k], s12[k], atol=RESUME_TOL, rtol=0), k
    assert (m1.args.rope_scaling, m1.args.max_seq_len) == (2.0, 128)
    # transformers reads the same model, RoPE scaling included, and computes the same logits
    hf = LlamaForCausalLM.from_pretrained(one).eval()
    tokens = torch.randint(0, 512, (1, 128), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = m1.eval()(tokens)
        theirs = hf(tokens).logits
    assert (ours - theirs).abs().max() <= 1e-4


# train.py --full under torchrun, watched: rank 1 writes its checkpoint shards a second late and then notes it;
# rank 0 records, whenever a checkpoint gets its final name, whether rank 1 had written and state.json was there;
# every rank records the sizes and dtype of FSDP2's reduce-scatters and how long each checkpoint save took
FULL_SAVE_WATCH = """
import json, os, sys, time, train
import torch.distributed as dist
from torch.distributed.checkpoint import FileSystemWriter
rank, out = int(os.environ["RANK"]), sys.argv[sys.argv.index("--out") + 1]
write, replace, reduce_scatter, save = FileSystemWriter.write_data, os.replace, dist.reduce_scatter_single, train.save_checkpoint
seen = {"renames": [], "reduce_scatter": [], "save_s": []}
def late_write(self, plan, planner):
    if rank == 1:
        time.sleep(1)
    done = write(self, plan, planner)
    if rank == 1:
        with open(out + ".rank1-wrote", "a") as f:
            f.write(str(self.path) + "\\n")
    return done
def watched_replace(src, dst):
    if os.path.basename(dst).startswith("step-"):
        wrote = open(out + ".rank1-wrote").read().split() if os.path.exists(out + ".rank1-wrote") else []
        seen["renames"].append([os.path.basename(dst), os.path.join(src, "dcp") in wrote,
                                os.path.exists(os.path.join(src, "state.json"))])
    return replace(src, dst)
def watched_reduce_scatter(output, input, *args, **kwargs):
    seen["reduce_scatter"].append([input.numel() * input.element_size(), output.numel() * output.element_size(), str(input.dtype)])
    return reduce_scatter(output, input, *args, **kwargs)
def timed_save(*args, **kwargs):
    t0 = time.perf_counter()
    save(*args, **kwargs)
    seen["save_s"].append(time.perf_counter() - t0)
FileSystemWriter.write_data, os.replace, dist.reduce_scatter_single, train.save_checkpoint = (
    late_write, watched_replace, watched_reduce_scatter, timed_save)
code = train.main(sys.argv[1:])
with open(f"{out}.rank{rank}.json", "w") as f:
    json.dump(seen, f)
os._exit(code)
"""


@pytest.fixture(scope="module")
def full_run(hf_base, corpus, token_cache, tmp_path_factory):
    """(run folder, what each rank saw) of 2 FSDP ranks training --full in bf16 (fp32 reduction) for 2 steps, a
    checkpoint after each (FULL_SAVE_WATCH)."""
    d = tmp_path_factory.mktemp("full_run")
    (d / "watch.py").write_text(f"import sys\nsys.path.insert(0, {ROOT!r})\n" + FULL_SAVE_WATCH)
    out = str(d / "run")
    run_torchrun(common(hf_base, corpus, token_cache, grad_accum=1, steps=2, save_every=1, dtype="bf16", out=out)
                 + ["--full"], script=str(d / "watch.py"))
    return out, [json.load(open(f"{out}.rank{rank}.json")) for rank in (0, 1)]


def test_each_rank_writes_its_own_shard_of_a_full_checkpoint_one_file_per_tensor_shard(full_run, hf_base):
    """No rank gathers: each rank's files hold half of every fp32 weight and AdamW moment (12 bytes per parameter,
    2 ranks, every dimension even), and no file more than one tensor's half (host memory: one shard at a time)."""
    out, seen = full_run
    params = Transformer.from_pretrained(hf_base).parameters()
    sizes = [p.numel() for p in params]
    dcp_dir = os.path.join(out, "checkpoints", "step-000002", "dcp")
    files = {n: os.path.getsize(os.path.join(dcp_dir, n)) for n in os.listdir(dcp_dir) if n.endswith(".distcp")}
    per_rank = [sum(v for n, v in files.items() if n.startswith(f"__{rank}_")) for rank in (0, 1)]
    print(f"per-rank bytes {per_rank}, 12 bytes x {sum(sizes)} parameters = {12 * sum(sizes)}, {len(files)} files, "
          f"largest {max(files.values())}, save times {[round(t, 3) for t in seen[0]['save_s']]} s")
    for rank in (0, 1):
        assert 6 * sum(sizes) <= per_rank[rank] <= 6 * sum(sizes) * 1.5, (rank, per_rank)
    assert max(files.values()) <= 4 * max(sizes) / 2 + 2048  # half of the largest tensor, and torch.save's header


def test_a_full_checkpoint_gets_its_name_only_after_every_rank_has_written_its_shards(full_run):
    """Rank 1 writes a second late; rank 0 renames each checkpoint into place only after that, state.json there."""
    _, seen = full_run
    assert seen[0]["renames"] == [["step-000001", True, True], ["step-000002", True, True]], seen[0]["renames"]


def test_the_estimated_reduce_scatter_staging_is_what_fsdp2_stages(full_run, hf_base):
    """--full in bf16: FSDP2 reduce-scatters each unit's gradients through an fp32 buffer of the whole unit and one
    of its half; the largest is the estimate's staging term for this model on 2 GPUs."""
    from longlora.estimate import config_args, estimate

    _, seen = full_run
    for rank in (0, 1):
        staged = seen[rank]["reduce_scatter"]
        assert staged and {dtype for *_, dtype in staged} == {"torch.float32"}
        largest = max(i + o for i, o, _ in staged)
        assert largest == estimate(config_args(hf_base), 128, "s2", 2, 1, 1, full=True)["memory"]["reduce-scatter staging (fp32)"]


@pytest.mark.parametrize("layout", ["meta", "own"])
def test_full_fine_tuning_writes_the_bases_layout(layout, hf_base, corpus, token_cache, tmp_path):
    from longlora.weights import write_model
    from longlora.weights import checkpoint_layout

    base_dir, out = str(tmp_path / "base"), str(tmp_path / "out")
    base = Transformer.from_pretrained(hf_base, dtype=torch.bfloat16 if layout == "meta" else torch.float32)
    write_model(base.args, base.state_dict(), base_dir, layout, base.tokenizer.path)  # a bf16 Meta base, an fp32 own one
    assert train.main(common(base_dir, corpus, token_cache, steps=1, grad_accum=1, out=out) + ["--full"]) == 0
    assert checkpoint_layout(out) == layout
    tuned = Transformer.from_pretrained(out)  # strict
    assert (tuned.args.rope_scaling, tuned.args.max_seq_len, tuned.args.attn) == (2.0, 128, "full")
    trained = dcp_weights(os.path.join(out, "checkpoints", "step-000001"))
    assert trained.keys() == tuned.state_dict().keys()
    for k, v in tuned.state_dict().items():  # the fp32 masters, written in the base's dtype
        assert v.dtype == base.state_dict()[k].dtype and torch.equal(v, trained[k].to(v.dtype)), k
        assert not torch.equal(trained[k], base.state_dict()[k].float()), k  # it trained


# train.main with a torch.save that stops, says so, and sleeps before the optimizer file of checkpoint 4
PAUSE_IN_SAVE = """
import sys, time, torch, train
save = torch.save
def pausing_save(obj, path, *args, **kwargs):
    if path.endswith("optimizer.pt") and "step-000004" in path:
        print("paused in save", flush=True)
        time.sleep(120)
    return save(obj, path, *args, **kwargs)
torch.save = pausing_save
sys.exit(train.main(sys.argv[1:]))
"""


def test_kill_during_a_save_keeps_the_previous_checkpoint_and_resume_repeats_the_losses(base_dir, corpus, token_cache, tmp_path):
    out = str(tmp_path / "run")
    # LoRA dropout: the losses after the resume repeat only if the random stream is restored too
    args = common(base_dir, corpus, token_cache, grad_accum=2, steps=4, lora_dropout=0.1, out=out)
    # train.py in a subprocess whose torch.save sleeps before the optimizer file of checkpoint 4 (the weights
    # are written by then, the rest not), so that the test can kill it in the middle of the save
    proc = subprocess.Popen([sys.executable, "-c", PAUSE_IN_SAVE, *args], cwd=ROOT, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})
    for line in proc.stdout:  # ends when the pause begins, or at EOF if train.py exits first
        if line.startswith("paused in save"):
            break
    else:
        raise AssertionError("checkpoint 4 never started: " + proc.communicate()[1][-2000:])
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    uninterrupted, _ = losses(out)  # steps 1..4 were logged before the save began
    assert sorted(uninterrupted) == [1, 2, 3, 4]
    ckpts = os.path.join(out, "checkpoints")
    assert any(os.path.exists(os.path.join(ckpts, n, "trainable.safetensors")) for n in os.listdir(ckpts)
               if "step-000004" in n)  # killed mid-save: checkpoint 4 is partly on disk
    ckpt = find_checkpoint(out)
    assert ckpt.endswith("step-000002") and json.load(open(os.path.join(ckpt, "state.json")))["step"] == 2
    assert len(load_file(os.path.join(ckpt, "trainable.safetensors"))) > 0
    assert train.main(args + ["--resume", out]) == 0
    resumed, _ = losses(out)
    assert sorted(resumed) == [1, 2, 3, 4]
    for s in (3, 4):
        assert abs(resumed[s] - uninterrupted[s]) <= RESUME_TOL, (s, resumed[s], uninterrupted[s])
    assert sorted(os.listdir(ckpts)) == ["step-000002", "step-000004"]  # the half-written one is gone


@pytest.mark.parametrize("damage", ["truncated", "missing", "no metadata"])
def test_resume_falls_back_from_a_full_checkpoint_with_a_damaged_shard_and_names_it(damage, hf_base, corpus, token_cache,
                                                                                   tmp_path, capsys):
    """--full (DCP shards): one shard file of the newest checkpoint cut short or gone, or its .metadata gone: resume
    names the file and continues from the previous checkpoint, with the loss of the uninterrupted run."""
    out = str(tmp_path / "run")
    args = common(hf_base, corpus, token_cache, grad_accum=1, save_every=1, keep=3, out=out) + ["--full"]
    assert train.main(args) == 0
    uninterrupted, _ = losses(out)
    shutil.rmtree(os.path.join(out, "checkpoints", "step-000003"))  # the run as if it had stopped after step 2
    dcp_dir = os.path.join(out, "checkpoints", "step-000002", "dcp")
    name = ".metadata" if damage == "no metadata" else max(
        (n for n in os.listdir(dcp_dir) if n.endswith(".distcp")), key=lambda n: os.path.getsize(os.path.join(dcp_dir, n)))
    if damage == "truncated":
        os.truncate(os.path.join(dcp_dir, name), os.path.getsize(os.path.join(dcp_dir, name)) - 1)
    else:
        os.remove(os.path.join(dcp_dir, name))
    capsys.readouterr()
    assert train.main(args + ["--resume", out]) == 0
    captured = capsys.readouterr()
    assert f"step-000002/dcp/{name}" in captured.err and "previous checkpoint" in captured.err, captured.err
    assert f"resumed from {os.path.join(out, 'checkpoints', 'step-000001')} at step 1" in captured.out
    resumed, _ = losses(out)
    for s in (2, 3):
        assert abs(resumed[s] - uninterrupted[s]) <= RESUME_TOL, (s, resumed[s], uninterrupted[s])


def test_old_checkpoints_are_deleted_only_after_the_new_one_is_complete(base_dir, corpus, token_cache, tmp_path, monkeypatch):
    """--keep 2, a checkpoint every step for 5 steps: whenever an older checkpoint is deleted, the one being
    saved is already complete on disk (state.json, written last), so a kill at that moment leaves it."""
    from longlora import checkpoint

    out = str(tmp_path / "run")
    saving, deleted = [], []
    rmtree, save = shutil.rmtree, train.save_checkpoint

    def observed_save(run_dir, step, *args, **kwargs):
        saving.append(step)
        save(run_dir, step, *args, **kwargs)
        assert [os.path.basename(d) for d in checkpoint_dirs(out)] == [f"step-{s:06d}" for s in saving[-2:]]

    def observed_rmtree(path, *args, **kwargs):
        name = os.path.basename(path)
        if name.startswith("step-") and name != f"step-{saving[-1]:06d}":
            new = os.path.join(out, "checkpoints", f"step-{saving[-1]:06d}", "state.json")
            deleted.append((name, saving[-1], os.path.exists(new)))
        return rmtree(path, *args, **kwargs)

    monkeypatch.setattr(train, "save_checkpoint", observed_save)
    monkeypatch.setattr(checkpoint.shutil, "rmtree", observed_rmtree)
    assert train.main(common(base_dir, corpus, token_cache, steps=5, grad_accum=1, save_every=1, keep=2, out=out)) == 0
    assert [(name, step) for name, step, _ in deleted] == [(f"step-{s:06d}", s + 2) for s in (1, 2, 3)]
    assert all(complete for _, _, complete in deleted), deleted


def test_training_from_scratch_lowers_heldout_loss_measured_with_full_attention_and_saves_a_loadable_model(
        corpus, sp_model, tmp_path):
    # trained with S²-Attn; the held-out loss must be that of full attention, as the model is used
    out = str(tmp_path / "scratch")
    argv = ["--from-scratch", "tiny", "--tokenizer", sp_model, "--data", corpus, "--ctx", "64", "--attn", "s2",
            "--steps", "40", "--batch-size", "4", "--grad-accum", "1", "--lr", "3e-3", "--warmup", "4",
            "--schedule", "cosine", "--heldout", "0.02", "--eval-every", "20", "--eval-samples", "16",
            "--save-every", "40", "--out", out]
    assert train.main(argv) == 0
    _, held = losses(out)
    assert sorted(held) == [0, 20, 40] and held[40] < held[0] - 1.0, held
    # the saved model (with its tokenizer) gives the logged held-out loss when evaluated independently
    model = Transformer.from_pretrained(out).eval()
    assert model.tokenizer is not None and model.args.attn == "full"
    tokens = open_tokens(os.path.join(out, "tokens", [n for n in os.listdir(os.path.join(out, "tokens"))
                                                            if n.endswith(".bin")][0]))
    n = (len(tokens) - 1) // 64
    _, held_ids = split_heldout(n, 0.02)
    seqs = torch.stack([torch.from_numpy(np.asarray(tokens[w * 64:w * 64 + 65], dtype=np.int64)) for w in held_ids[:16]])

    def heldout_loss(attn):  # mean over all 16 x 64 targets, by a plain forward and cross-entropy
        model.args.attn = attn
        with torch.no_grad():
            return F.cross_entropy(model(seqs[:, :-1]).flatten(0, 1), seqs[:, 1:].flatten()).item()

    assert abs(heldout_loss("full") - held[40]) < 1e-4
    assert abs(heldout_loss("s2") - held[40]) > 1e-3  # so the line above can tell the two attentions apart


def test_a_tokenizer_folder_trains_and_its_files_go_with_the_model(corpus, hf_tokenizer, tmp_path):
    """--tokenizer DIR with an HF tokenizer.json: the data is tokenized with it and the saved model carries every
    tokenizer file, so it loads with the same tokenizer and chat template."""
    out = str(tmp_path / "run")
    assert train.main(["--from-scratch", "tiny", "--tokenizer", hf_tokenizer, "--data", corpus, "--ctx", "64",
                       "--steps", "1", "--heldout", "0", "--out", out]) == 0
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert open(os.path.join(out, name), "rb").read() == open(os.path.join(hf_tokenizer, name), "rb").read()
    model, tok = Transformer.from_pretrained(out), Tokenizer(hf_tokenizer)
    assert model.args.vocab_size == tok.vocab_size and model.tokenizer.eos_ids == tok.eos_ids
    chat = [{"role": "user", "content": "Hi"}]
    assert model.tokenizer.apply_chat_template(chat) == tok.apply_chat_template(chat)
    tokens = open_tokens(next(str(p) for p in (tmp_path / "run" / "tokens").glob("*.bin")))
    first = sorted(os.listdir(corpus))[0]
    assert tokens[:50].tolist() == tok.encode(open(os.path.join(corpus, first), encoding="utf-8").read(), eos=True)[:50]


# ----------------------------------------------------------------------------------------------------
# The recipe: train.py's defaults are LongLoRA's, and a run uses them

# Our reading of LongLoRA's recipe: the fine-tuning command of dvlab-research/LongLoRA's README
# (--learning_rate 2e-5 --weight_decay 0.0 --warmup_steps 20 --lr_scheduler_type constant_with_warmup
# --per_device_train_batch_size 1 --gradient_accumulation_steps 8 --max_steps 1000 --bf16 True), the settings
# it leaves to HF TrainingArguments' defaults (adam_beta1 0.9, adam_beta2 0.999, adam_epsilon 1e-8,
# max_grad_norm 1.0), fine-tune.py's LoraConfig(r=8, lora_alpha=16, lora_dropout=0, q/k/v/o_proj) with
# trainable "embed,norm", and S²-Attn's group size ratio 1/4 (paper, Sec. 3.2). The sink count is SinkLoRA's.
RECIPE = {"lr": 2e-5, "warmup": 20, "schedule": "constant", "weight_decay": 0.0, "beta2": 0.999, "grad_clip": 1.0,
          "batch_size": 1, "grad_accum": 8, "steps": 1000, "dtype": "auto", "attn": "s2", "group_size": None,
          "sink_tokens": 4, "shift_wrap": False, "lora_r": 8, "lora_alpha": 16.0, "lora_dropout": 0.0,
          "lora_targets": ["wq", "wk", "wv", "wo"], "no_train_embed": False, "no_train_norms": False,
          "no_grad_ckpt": False}


def test_defaults_are_longloras_recipe(tmp_path):
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "tokenizer.model").write_text("")  # (only looked for here)
    (tmp_path / "data.txt").write_text("text")
    a = parse_args(["--model", str(tmp_path / "base"), "--data", str(tmp_path / "data.txt"), "--out", str(tmp_path / "out")],
                   train.RECIPE)
    assert {k: getattr(a, k) for k in RECIPE} == RECIPE


def test_sft_groups_default_to_longloras_rule_or_with_shift_wrap_to_a_quarter_and_pad_to_the_group_size():
    """--sft without --group-size: LongLoRA's SFT rule, whose groups can exceed a batch; --shift-wrap's roll cannot
    take those, so it gets T/4 of the padded batch. A fixed --group-size pads each batch to a multiple of it (so
    its groups tile the batch), full attention to a multiple of 8."""
    from longlora.run import pad_multiple, sft_group_rule

    parse = lambda *flags: parse_args(["--estimate", "--preset", "tiny", "--ctx", "128", "--sft", *flags], train.RECIPE)  # noqa: E731
    assert sft_group_rule(parse()) == "official"
    assert sft_group_rule(parse("--shift-wrap")) == "quarter"
    assert sft_group_rule(parse("--group-size", "32")) is None and sft_group_rule(parse("--attn", "full")) is None
    assert pad_multiple(parse("--group-size", "32")) == 32 and pad_multiple(parse("--attn", "full")) == 8
    assert pad_multiple(parse()) == 8


def test_a_default_run_trains_with_the_recipe(base_dir, corpus, token_cache, tmp_path, monkeypatch):
    """Two steps with every recipe default except the length of the run (and a weight decay, to see where it
    goes): what AdamW, the clipping and the model get, and the logged schedule and tokens per step."""
    seen = {}

    class SpyAdamW(torch.optim.AdamW):
        def __init__(self, groups, **kw):
            seen["groups"], seen["kw"] = [(g["weight_decay"], [p.ndim for p in g["params"]]) for g in groups], kw
            super().__init__(groups, **kw)

    clip = torch.nn.utils.clip_grad_norm_

    def spy_clip(params, max_norm, *args, **kw):
        seen.setdefault("max_norm", []).append(max_norm)
        return clip(params, max_norm, *args, **kw)

    build = train.build_model
    monkeypatch.setattr(torch.optim, "AdamW", SpyAdamW)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy_clip)
    monkeypatch.setattr(train, "build_model", lambda *a, **k: seen.setdefault("built", build(*a, **k)))
    out = str(tmp_path / "run")
    argv = ["--model", base_dir, "--data", corpus, "--token-cache", token_cache, "--ctx", "128", "--steps", "2",
            "--weight-decay", "0.1", "--out", out]
    assert train.main(argv) == 0
    assert seen["kw"] == {"lr": 2e-5, "betas": (0.9, 0.999), "eps": 1e-8}
    (wd_matrices, ndims_matrices), (wd_vectors, ndims_vectors) = seen["groups"]  # decay on matrices, not norms
    assert wd_matrices == 0.1 and min(ndims_matrices) == 2 and wd_vectors == 0.0 and set(ndims_vectors) == {1}
    assert seen["max_norm"] == [1.0, 1.0]
    model = seen["built"][0]
    assert model.args.attn == "s2" and resolve_group_size("s2", 128, model.args.group_size) == 128 // 4
    assert model.lean and model.gradient_checkpointing
    with open(os.path.join(out, "metrics.jsonl")) as f:
        steps = [r for r in map(json.loads, f) if "loss" in r]
    assert [r["lr"] for r in steps] == [2e-5 * 1 / 20, 2e-5 * 2 / 20]  # linear warmup over 20 steps
    assert [r["tokens"] for r in steps] == [1 * 8 * 128] * 2  # batch 1 x accumulation 8 sequences of ctx
    cfg = json.load(open(os.path.join(out, "adapter_config.json")))
    assert (cfg["r"], cfg["alpha"], cfg["dropout"], cfg["targets"], cfg["embed"], cfg["norms"]) == \
        (8, 16.0, 0.0, ["wq", "wk", "wv", "wo"], True, True)


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_lr_warms_up_linearly_then_stays_or_follows_a_cosine_to_the_floor(schedule):
    a = build_parser(train.RECIPE).parse_args(["--schedule", schedule, "--steps", "120"])
    assert a.min_lr_ratio == 0.1
    lr = [train.lr_at(s, a) for s in range(1, 121)]
    assert lr[:20] == pytest.approx([2e-5 * s / 20 for s in range(1, 21)], rel=1e-12)
    if schedule == "constant":
        assert lr[20:] == [2e-5] * 100
    else:  # half a cosine from lr right after warmup to lr x min_lr_ratio at the last step
        expect = [2e-6 + (2e-5 - 2e-6) * 0.5 * (1 + math.cos(math.pi * (s - 20) / 100)) for s in range(21, 121)]
        assert lr[20:] == pytest.approx(expect, rel=1e-12) and lr[-1] == pytest.approx(2e-6, rel=1e-12)


# ----------------------------------------------------------------------------------------------------
# Bad input: one line, exit 2


SMALL_RUN = dict(lr=1e-3, warmup=1, grad_accum=1, steps=2)  # what small_run trained with, and one step more


@pytest.fixture(scope="module")
def small_run(base_dir, corpus, token_cache, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("small"))
    assert train.main(common(base_dir, corpus, token_cache, steps=1, grad_accum=1, save_every=1, out=out)) == 0
    return out


BAD = {
    "missing model": (dict(model="/nonexistent/model"), "no such directory"),
    "missing data": (dict(data="/nonexistent/data.txt"), "no such file"),
    "group does not divide ctx": (dict(ctx=120, group_size=32), "not a multiple of the s2 group size 32"),
    "default group needs ctx % 8": (dict(ctx=100), "not a multiple"),
    "empty dataset": (dict(data="EMPTY"), "empty dataset"),
    "data below one sequence": (dict(data="SHORT"), "fewer than one sequence"),
    "lora flag with from-scratch": (dict(model=None, from_scratch="tiny", tokenizer="TOK", lora_r=4), "--lora-r does not apply"),
    "lora flag with full": (dict(full="", lora_targets="wq"), "--full trains every parameter; --lora-targets does not apply"),
    "sft group rule without sft": (dict(sft_group_size="official"), "--sft-group-size applies to --sft"),
    "two model sources": (dict(preset="tiny"), "exactly one of --model, --preset, --from-scratch"),
    "resume from another config": (dict(resume="RUN", lr=5e-4, out="NEW"), "lr=0.001"),
    "out holds an earlier run": (dict(out="RUN"), "holds an earlier run and its result; add --resume"),
    "resume from a checkpoint missing a tensor": (dict(resume="RUN-MISSING", **SMALL_RUN, out="NEW"),
                                                  "tensor layers.0.attention.wq.lora_b is missing"),
    "resume from a checkpoint with an extra tensor": (dict(resume="RUN-EXTRA", **SMALL_RUN, out="NEW"),
                                                      "tensor layers.0.attention.wq.bias is unexpected"),
    "unknown flag": (dict(colour="red"), "unrecognized arguments"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_and_exit_2(case, base_dir, corpus, token_cache, small_run, sp_model, tmp_path, capsys):
    kw, message = BAD[case]
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "short.txt").write_text("x = 1\n")
    subst = {"EMPTY": str(tmp_path / "empty.txt"), "SHORT": str(tmp_path / "short.txt"), "RUN": small_run,
             "NEW": str(tmp_path / "new"), "TOK": sp_model}
    for name, edit in [("RUN-MISSING", lambda t: t.pop("layers.0.attention.wq.lora_b")),
                       ("RUN-EXTRA", lambda t: t.update({"layers.0.attention.wq.bias": torch.zeros(64)}))]:
        if name in kw.values():  # small_run's checkpoint with one tensor dropped from, or added to, its file
            ckpt = os.path.join(tmp_path, name, "step-000001")
            shutil.copytree(os.path.join(small_run, "checkpoints", "step-000001"), ckpt)
            tensors = load_file(os.path.join(ckpt, "trainable.safetensors"))
            edit(tensors)
            save_file(tensors, os.path.join(ckpt, "trainable.safetensors"))
            subst[name] = ckpt
    args = dict(model=base_dir, data=corpus, ctx=128, steps=1, token_cache=token_cache, out=str(tmp_path / "out"))
    args.update({k: subst.get(v, v) for k, v in kw.items()})
    argv = []
    for k, v in args.items():
        if v is not None:
            argv += [f"--{k.replace('_', '-')}"] + ([str(v)] if v != "" else [])  # "": a switch
    assert train.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_command_line_exits_2_with_one_line(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--model", "/nonexistent", "--data", str(tmp_path),
                        "--out", str(tmp_path / "o")], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and r.stderr.strip() == "error: --model /nonexistent: no such directory"


def test_no_flag_is_a_prefix_of_a_torchrun_flag():
    """A flag of ours typed before train.py on a torchrun line must not be taken for one of torchrun's."""
    from torch.distributed.run import get_args_parser

    theirs = {o for a in get_args_parser()._actions for o in a.option_strings if o.startswith("--")} - {"--help"}
    ours = {o for a in build_parser(train.RECIPE)._actions for o in a.option_strings if o.startswith("--")} - {"--help"}
    assert not [(o, t) for o in ours for t in theirs if t.startswith(o) or o.startswith(t)]


# ----------------------------------------------------------------------------------------------------
# Tied embeddings (Llama 3.2 1B/3B, Qwen2.5 0.5B/1.5B, SmolLM2): LoRA+ trains the one shared matrix


@pytest.fixture(scope="module")
def tied_base(tmp_path_factory, sp_model):
    """A tiny random LLaMA with tied input and output embeddings, written by transformers (64 positions)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    d = tmp_path_factory.mktemp("tied_base")
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=512, max_position_embeddings=64, rms_norm_eps=1e-5,
                      tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(str(d))
    (d / "tokenizer.model").write_bytes(open(sp_model, "rb").read())
    return str(d)


def test_lora_plus_on_tied_embeddings_stores_the_shared_matrix_once_and_every_use_of_the_adapter_agrees(
        tied_base, corpus, token_cache, tmp_path, capsys):
    """The adapter holds tok_embeddings once (no output.weight); it loads for sampling and evaluation with the two
    still one matrix; merged into HF, Meta and own layouts (and read by transformers) it gives the same logits; a
    run resumed from its step-1 checkpoint writes the same adapter; the PEFT export says in one line why not."""
    from transformers import LlamaForCausalLM

    from longlora.adapter import load_model
    from longlora.export import main as export_main

    out, half, resumed = (str(tmp_path / n) for n in ("run", "half", "resumed"))
    assert train.main(common(tied_base, corpus, token_cache, steps=2, out=out)) == 0
    adapter = load_file(os.path.join(out, "adapter.safetensors"))
    assert "tok_embeddings.weight" in adapter and "output.weight" not in adapter
    base = Transformer.from_pretrained(tied_base)
    assert not torch.equal(adapter["tok_embeddings.weight"], base.tok_embeddings.weight)  # it trained
    model = load_model(tied_base, out)  # what sample.py --adapter and eval do
    assert model.output.weight is model.tok_embeddings.weight
    assert torch.equal(model.tok_embeddings.weight, adapter["tok_embeddings.weight"])
    x = torch.randint(0, 512, (1, 40))
    with torch.no_grad():
        ref = model(x)
        for fmt in ("hf", "meta", "own"):
            merged = str(tmp_path / f"merged-{fmt}")
            assert export_main(["merge", "--base", tied_base, "--adapter", out, "--out", merged, "--format", fmt]) == 0
            assert (Transformer.from_pretrained(merged).eval()(x) - ref).abs().max().item() <= 1e-5, fmt
        hf = LlamaForCausalLM.from_pretrained(str(tmp_path / "merged-hf")).eval()
        assert (hf(x).logits - ref).abs().max().item() <= 1e-4
    capsys.readouterr()
    assert export_main(["peft", "--base", tied_base, "--adapter", out, "--out", str(tmp_path / "peft")]) == 2
    assert "tied to the output head is not supported" in capsys.readouterr().err
    assert train.main(common(tied_base, corpus, token_cache, steps=2, save_every=1, out=half)) == 0
    assert train.main(common(tied_base, corpus, token_cache, steps=2, out=resumed,
                             resume=os.path.join(half, "checkpoints", "step-000001"))) == 0
    again = load_file(os.path.join(resumed, "adapter.safetensors"))
    assert again.keys() == adapter.keys()
    for k in adapter:
        torch.testing.assert_close(again[k], adapter[k], rtol=0, atol=1e-6)


def test_a_result_that_could_not_be_written_is_refused_before_the_first_step(tied_base, corpus, token_cache, tmp_path,
                                                                             monkeypatch, capsys):
    """The adapter is built from stand-ins before training, as it is at the end: a trainable tensor it would not
    store (here the tied head come apart from the embedding) is one error line before any step runs."""
    from longlora import run

    build = run.adapter_model

    def untied(model, tensors):
        shadow = build(model, tensors)
        shadow.output.weight = torch.nn.Parameter(torch.empty_like(shadow.output.weight))  # trainable, not stored
        return shadow

    monkeypatch.setattr(run, "adapter_model", untied)
    out = str(tmp_path / "run")
    assert train.main(common(tied_base, corpus, token_cache, steps=2, out=out)) == 2
    assert "parameter output.weight is trainable but an adapter does not store it" in capsys.readouterr().err
    assert not os.path.exists(os.path.join(out, "checkpoints"))
    assert open(os.path.join(out, "metrics.jsonl")).read() == ""  # no step ran


# ----------------------------------------------------------------------------------------------------
# What a step communicates, what it trains on, how a checkpoint appears


# train.py under torchrun, recording each call of set_requires_gradient_sync into a file per rank
GRAD_SYNC_WATCH = """
import json, os, sys, train
from torch.distributed.fsdp import FSDPModule
calls, original = [], FSDPModule.set_requires_gradient_sync
def spy(self, requires_gradient_sync, **kwargs):
    calls.append(requires_gradient_sync)
    return original(self, requires_gradient_sync, **kwargs)
FSDPModule.set_requires_gradient_sync = spy
code = train.main(sys.argv[1:])
out = sys.argv[sys.argv.index("--out") + 1]
with open(f"{out}.sync-rank{os.environ['RANK']}.json", "w") as f:
    json.dump(calls, f)
os._exit(code)
"""


@pytest.mark.parametrize("full", [False, True], ids=["lora", "full"])
def test_gradients_are_reduced_once_per_step_with_lora_and_every_micro_batch_with_full(base_dir, corpus, token_cache,
                                                                                      tmp_path, full):
    """--grad-accum 2 over 2 steps: LoRA syncs only the last micro-batch of a step ([False, True] per step, the
    trainable gradients wait whole on each rank); --full syncs every micro-batch (a whole fp32 gradient of every
    parameter would not fit)."""
    (tmp_path / "watch.py").write_text(f"import sys\nsys.path.insert(0, {ROOT!r})\n" + GRAD_SYNC_WATCH)
    out = str(tmp_path / "run")
    run_torchrun(common(base_dir, corpus, token_cache, grad_accum=2, steps=2, out=out) + (["--full"] if full else []),
                 script=str(tmp_path / "watch.py"))
    for rank in (0, 1):
        calls = json.load(open(f"{out}.sync-rank{rank}.json"))
        assert calls == ([True] * 4 if full else [False, True] * 2), (rank, calls)


def test_the_held_out_windows_are_never_trained_on(base_dir, corpus, token_cache, tmp_path):
    """--heldout 0.5: the training and the held-out windows are disjoint and together are every window."""
    from longlora.run import load_data

    a = parse_args(common(base_dir, corpus, token_cache, heldout=0.5, out=str(tmp_path / "run")), train.RECIPE)
    train_data, held = load_data(a, Tokenizer(os.path.join(base_dir, "tokenizer.model")), 0, False)
    assert set(train_data.ids.tolist()).isdisjoint(held.ids.tolist())
    assert sorted([*train_data.ids.tolist(), *held.ids.tolist()]) == list(range(train_data.n_windows))
    assert abs(len(held) - train_data.n_windows / 2) <= 1


def test_a_checkpoint_is_written_under_a_temporary_name_and_appears_whole(base_dir, corpus, token_cache, tmp_path,
                                                                        monkeypatch):
    """While a checkpoint's files are being written, its final folder does not exist yet: a kill then leaves the
    previous checkpoint, never a half-written one under the final name."""
    out = str(tmp_path / "run")
    writes, save = [], torch.save

    def watched(obj, path, *args, **kwargs):
        if "checkpoints" in str(path):
            step_dir = os.path.join(out, "checkpoints", "step-000001")
            writes.append((os.path.basename(os.path.dirname(path)), os.path.exists(step_dir)))
        return save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", watched)
    assert train.main(common(base_dir, corpus, token_cache, steps=1, save_every=1, out=out)) == 0
    assert writes and all(folder.startswith(".tmp-step-000001") and not final for folder, final in writes), writes
    assert os.listdir(os.path.join(out, "checkpoints")) == ["step-000001"]


def test_step_s_trains_on_the_global_samples_of_step_s(base_dir, corpus, token_cache, tmp_path, monkeypatch):
    """Global sample j of the run is sample_positions(n, seed, j): step s, micro-batch m reads samples
    (s-1)·G + m·B .. (s-1)·G + (m+1)·B - 1 in one process (G = B·A), so the data order depends on the step alone."""
    from longlora.data import PackedData, sample_positions

    read, batch = [], PackedData.batch
    monkeypatch.setattr(PackedData, "batch", lambda self, positions: read.append((len(self), list(positions)))
                        or batch(self, positions))
    out = str(tmp_path / "run")
    assert train.main(common(base_dir, corpus, token_cache, steps=2, batch_size=2, grad_accum=2, heldout=0, out=out)) == 0
    n = read[0][0]
    assert [p for _, p in read] == [sample_positions(n, 0, j, 2).tolist() for j in (0, 2, 4, 6)]


# ----------------------------------------------------------------------------------------------------
# Before a GPU run: the torch version under torchrun, the attention backend in the log


@pytest.mark.parametrize("version,ok", [("2.7.1+cu126", False), ("2.8.0", True), ("2.10.0a0+git1234", True),
                                        ("2.13.0+cpu", True), ("1.13.1", False)])
def test_torchrun_needs_torch_2_8_for_mixed_dtype_fsdp_units(version, ok):
    from longlora.cli import UsageError
    from longlora.shard import check_torch_version

    if ok:
        check_torch_version(version)
    else:
        with pytest.raises(UsageError, match=rf"needs torch >= 2\.8 .*this is torch {re.escape(version)}"):
            check_torch_version(version)


def test_under_torchrun_an_old_torch_is_refused_before_the_process_group_starts(monkeypatch):
    from longlora import shard
    from longlora.cli import UsageError

    for k, v in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="2").items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(shard.torch, "__version__", "2.7.1+cu126")
    monkeypatch.setattr(shard.dist, "init_process_group", lambda *a, **k: pytest.fail("the process group started"))
    with pytest.raises(UsageError, match="needs torch >= 2.8"):
        shard.setup_distributed()


def test_the_log_names_the_attention_backend_and_why_not_flash(monkeypatch):
    import attention
    from longlora import run

    cuda = torch.device("cuda")
    assert run.attention_backend(torch.device("cpu"), False) == \
        "PyTorch SDPA (not flash-attn: it runs on CUDA in bf16; this run is fp32 on cpu)"
    monkeypatch.setattr(run, "flash_varlen", lambda: (None, "flash-attn 2 cannot be imported (No module named 'flash_attn')"))
    assert run.attention_backend(cuda, True) == \
        "PyTorch SDPA (not flash-attn: flash-attn 2 cannot be imported (No module named 'flash_attn'))"
    monkeypatch.setattr(run, "flash_varlen", lambda: (attention.attention, None))
    assert run.attention_backend(cuda, True) == "flash-attn 2"
    assert run.attention_backend(cuda, False).startswith("PyTorch SDPA")


def test_a_run_logs_its_attention_backend(base_dir, corpus, token_cache, tmp_path, capsys):
    assert train.main(common(base_dir, corpus, token_cache, steps=1, ctx=32, out=str(tmp_path / "run"))) == 0
    assert "attention backend: PyTorch SDPA (not flash-attn: it runs on CUDA in bf16; this run is fp32 on cpu)" \
        in capsys.readouterr().out


def test_no_ffn_chunks_runs_the_feed_forward_whole_for_that_run_only(base_dir, corpus, token_cache, tmp_path, monkeypatch):
    """With CHUNK_SIZE below ctx the feed-forward runs in checkpointed chunks, with --no-ffn-chunks whole; the setting
    does not outlive the run."""
    from longlora import memory

    monkeypatch.setattr(memory, "CHUNK_SIZE", 8)
    checkpointed = []
    real = memory.checkpoint
    monkeypatch.setattr(memory, "checkpoint", lambda fn, *a, **k: checkpointed.append(fn.__name__) or real(fn, *a, **k))
    for flags, chunked in (([], True), (["--no-ffn-chunks"], False)):
        checkpointed.clear()
        out = str(tmp_path / f"run{chunked}")
        assert train.main(common(base_dir, corpus, token_cache, steps=1, ctx=32, out=out) + flags) == 0
        assert ("swiglu" in checkpointed) == chunked and "chunk_loss" in checkpointed
        assert memory.FFN_CHUNK_SIZE is None
