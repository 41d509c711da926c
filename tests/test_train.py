"""train.py: FSDP equals one process, resume repeats the losses, a kill during a save leaves the previous
checkpoint (checkpoint.py), training lowers held-out loss, clean failures, no flag shadows torchrun's.
(Data preparation: test_data.py; --estimate: test_estimate.py.)"""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, STDLIB
from checkpoint import find_checkpoint
from data import open_tokens, split_heldout
from lora import apply_lora, mark_trainable
from model import Transformer, preset
import train

# Two ranks (FSDP, gloo) against one process, fp32 on the CPU. The sums of two ranks' gradients are
# reduced in another order than one process accumulates them; observed difference 0, allowed:
FSDP_LOSS_TOL, FSDP_WEIGHT_TOL = 1e-5, 1e-6
RESUME_TOL = 1e-6  # a resumed fp32 run repeats the uninterrupted one (observed: exactly)
BF16_LOSS_TOL = 2e-2  # bf16 compute against fp32, same data (observed ~3e-4)


def run_torchrun(args, n=2, env=None):
    """train.py under torchrun with n ranks (FSDP over gloo), as a subprocess."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
           os.path.join(ROOT, "train.py"), *args]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, **(env or {})}, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return r


def losses(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        recs = [json.loads(line) for line in f]
    return {r["step"]: r["loss"] for r in recs if "loss" in r}, {r["step"]: r["heldout_loss"] for r in recs if "heldout_loss" in r}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from a second thread, and two spinning threads on a busy 2-core machine
    made in-process steps up to 50x slower; torchrun's ranks already run one thread each."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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


def test_two_fsdp_ranks_equal_one_process_and_resume_under_fsdp(base_dir, corpus, token_cache, tmp_path):
    one, two, resumed = (str(tmp_path / n) for n in ("one", "two", "resumed"))
    # the same global batch of 4 sequences: 1 process x 4 micro-batches, or 2 ranks x 2 (FSDP reduces the
    # gradients after the second only); --eval-every 2: a held-out evaluation (forward only) right before
    # the step-2 checkpoint is saved
    assert train.main(common(base_dir, corpus, token_cache, grad_accum=4, eval_every=2, out=one)) == 0
    run_torchrun(common(base_dir, corpus, token_cache, grad_accum=2, eval_every=2, out=two))
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
                        resume=os.path.join(two, "checkpoints", "step-000002")))
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


def test_bf16_fsdp_trains_fp32_copies_of_only_the_trainable_tensors(base_dir, corpus, token_cache, tmp_path):
    # GPU recipe on the CPU: frozen base in bf16, trainable tensors fp32, bf16 compute / fp32 reduction.
    ref, out = str(tmp_path / "fp32"), str(tmp_path / "bf16")
    assert train.main(common(base_dir, corpus, token_cache, grad_accum=2, steps=2, out=ref)) == 0
    run_torchrun(common(base_dir, corpus, token_cache, grad_accum=1, steps=2, dtype="bf16", eval_every=1, out=out))
    optim = torch.load(os.path.join(out, "checkpoints", "step-000002", "optimizer.pt"), weights_only=True)
    base = Transformer.from_pretrained(base_dir)
    apply_lora(base)
    mark_trainable(base)
    trainable = {n for n, p in base.named_parameters() if p.requires_grad}
    assert set(optim["state"]) == trainable  # no optimizer state for the frozen base
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
    args = common(base_dir, corpus, token_cache, grad_accum=2, steps=4, out=out)
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


def test_training_from_scratch_lowers_heldout_loss_and_saves_a_loadable_model(corpus, sp_model, tmp_path):
    out = str(tmp_path / "scratch")
    argv = ["--from-scratch", "tiny", "--tokenizer", sp_model, "--data", corpus, "--ctx", "64", "--attn", "full",
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
    total, count = 0.0, 0
    with torch.no_grad():
        for w in held_ids[:16]:
            seq = torch.from_numpy(np.asarray(tokens[w * 64:w * 64 + 65], dtype=np.int64))[None]
            loss = model(seq[:, :-1], seq[:, 1:])
            total, count = total + loss.item() * 64, count + 64
    assert abs(total / count - held[40]) < 1e-4


# ----------------------------------------------------------------------------------------------------
# Bad input: one line, exit 2


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
    "two model sources": (dict(preset="tiny"), "exactly one of --model, --preset, --from-scratch"),
    "resume from another config": (dict(resume="RUN", lr=5e-4, out="NEW"), "lr=0.001"),
    "out holds checkpoints": (dict(out="RUN"), "already holds checkpoints"),
    "unknown flag": (dict(colour="red"), "unrecognized arguments"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_and_exit_2(case, base_dir, corpus, token_cache, small_run, sp_model, tmp_path, capsys):
    kw, message = BAD[case]
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "short.txt").write_text("x = 1\n")
    subst = {"EMPTY": str(tmp_path / "empty.txt"), "SHORT": str(tmp_path / "short.txt"), "RUN": small_run,
             "NEW": str(tmp_path / "new"), "TOK": sp_model}
    args = dict(model=base_dir, data=corpus, ctx=128, steps=1, token_cache=token_cache, out=str(tmp_path / "out"))
    args.update({k: subst.get(v, v) for k, v in kw.items()})
    argv = []
    for k, v in args.items():
        if v is not None:
            argv += [f"--{k.replace('_', '-')}", str(v)]
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
    ours = {o for a in train.build_parser()._actions for o in a.option_strings if o.startswith("--")} - {"--help"}
    assert not [(o, t) for o in ours for t in theirs if t.startswith(o) or o.startswith(t)]
