"""shard.py: two FSDP ranks (gloo) each load only their half of a ~240 MB checkpoint, in Meta's 2-shard layout and
in sharded HF safetensors, with their host memory growing by their shard plus about one tensor; the sharded
model's logits equal one process's. And: train.py upcasts trainable tensors from the checkpoint's own dtype.

Run by pytest; torchrun runs this same file as the ranks' script (the __main__ block at the end)."""

import ctypes
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from longlora.run import parse_args
from longlora.shard import load_weights, shard_model
from longlora.tokenizer import Tokenizer
from longlora.weights import read_checkpoint, write_hf
from model import ModelArgs, Transformer
from test_model import write_meta_shards

# ~240 MB in fp32; the largest tensors are the two 32000 x 512 embeddings (65.5 MB each)
BIG = ModelArgs(dim=512, n_layers=8, n_heads=8, n_kv_heads=4, vocab_size=32000, multiple_of=256, max_seq_len=256)
LOGITS_TOL = 1e-5  # fp32, the same weights; the sharded forward all-gathers the same numbers (observed: 0)


def status_kb(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


@pytest.fixture(scope="session")
def big_checkpoints(tmp_path_factory):
    """The same random model written once in Meta's 2-shard layout and as HF safetensors in 100 MB files."""
    d = tmp_path_factory.mktemp("big")
    torch.manual_seed(0)
    model = Transformer(BIG).eval()
    write_meta_shards(model, d / "meta", n_shards=2, multiple_of=BIG.multiple_of)
    write_hf(BIG, model.state_dict(), str(d / "hf"), shard_size="100MB")
    tokens = torch.randint(0, BIG.vocab_size, (1, 16))
    with torch.no_grad():
        torch.save({"tokens": tokens, "logits": model(tokens)}, d / "ref.pt")
    return d, sum(p.numel() * p.element_size() for p in model.parameters())


def test_two_ranks_each_load_only_their_shard(big_checkpoints, tmp_path):
    d, model_bytes = big_checkpoints
    assert model_bytes >= 200e6
    assert len([f for f in os.listdir(d / "hf") if f.endswith(".safetensors")]) >= 2  # really sharded
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__,
           str(d / "ref.pt"), str(tmp_path), str(d / "meta"), str(d / "hf")]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    for layout in ("meta", "hf"):
        for rank in (0, 1):
            res = json.load(open(tmp_path / f"{layout}-rank{rank}.json"))
            print(layout, rank, {k: round(v / 1e6, 1) if k.endswith("bytes") else v for k, v in res.items()},
                  f"model {model_bytes / 1e6:.1f} MB")
            assert abs(res["local_bytes"] / model_bytes - 0.5) < 0.02, (layout, res)
            assert res["peak_growth_bytes"] < 0.75 * model_bytes, (layout, res)
            assert res["logits_diff"] <= LOGITS_TOL, (layout, res)


def test_a_missing_tensor_is_one_error_line_from_every_rank_without_a_hang(tmp_path, sp_model):
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, vocab_size=512, multiple_of=32)).save_pretrained(
        str(tmp_path / "m"), tokenizer_path=sp_model)
    state = load_file(str(tmp_path / "m" / "model.safetensors"))
    del state["layers.0.attention.wq.weight"]
    save_file(state, str(tmp_path / "m" / "model.safetensors"))
    (tmp_path / "d.txt").write_text("x = 1\n" * 2000)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", os.path.join(ROOT, "train.py"),
           "--model", str(tmp_path / "m"), "--data", str(tmp_path / "d.txt"), "--ctx", "64", "--out", str(tmp_path / "o")]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120)  # a hang would time out
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode != 0 and len(errors) == 1, r.stderr[-3000:]
    assert "missing tensor layers.0.attention.wq.weight" in errors[0]
    assert (tmp_path / "o" / "metrics.jsonl").read_text() == ""  # stopped before training


def test_trainable_tensors_are_upcast_from_the_checkpoints_own_dtype(tmp_path, sp_model):
    """An fp16 embedding must reach its fp32 master exactly; through bf16 it would lose 3 mantissa bits."""
    import train

    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=64, n_layers=1, n_heads=4, vocab_size=512, multiple_of=32, max_seq_len=64))
    state = {k: v.half() for k, v in model.state_dict().items()}
    write_hf(model.args, state, str(tmp_path / "fp16"), tokenizer_path=sp_model)
    a = parse_args(["--model", str(tmp_path / "fp16"), "--data", ROOT, "--out", str(tmp_path / "o"), "--ctx", "64",
                    "--dtype", "bf16"], train.RECIPE)
    checkpoint = read_checkpoint(a.model, ModelArgs)
    built, _, _ = train.build_model(a, Tokenizer(sp_model), torch.device("cpu"), False, checkpoint, bf16=True)
    emb = built.tok_embeddings.weight
    assert emb.dtype == torch.float32 and emb.requires_grad
    assert torch.equal(emb, state["tok_embeddings.weight"].float())
    assert built.layers[0].attention.wq.weight.dtype == torch.bfloat16  # frozen: the compute dtype


def rank_main(ref_path, out, *paths):
    """One rank: load each checkpoint sharded, measuring its resident memory across the load, then run the forward."""
    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, device = dist.get_rank(), torch.device("cpu")
    # Before measuring, what costs the same for any model: FSDP's and DTensor's imports and the meta device's
    # first use (PyTorch loads its meta kernels then; ~30 MB of code and tables, measured).
    with torch.device("meta"):
        shard_model(Transformer(ModelArgs(dim=64, n_layers=1, n_heads=4, vocab_size=64, multiple_of=32)), device, bf16=False)
    ref = torch.load(ref_path, weights_only=True)
    for path in paths:
        before = status_kb("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM, the peak resident set size, to the current size
        args, weights = read_checkpoint(path, ModelArgs)
        with torch.device("meta"):
            model = Transformer(args)
        shard_model(model, device, bf16=False)
        load_weights(model, weights, device, {}, path)
        peak = status_kb("VmHWM")
        assert all(isinstance(p, DTensor) for p in model.parameters())
        # units of their own, resharded after their forward (estimate.py counts them gathered only then)
        assert all(isinstance(mod, FSDPModule) for mod in (model.tok_embeddings, model.output, *model.layers))
        local = sum(p.to_local().numel() * p.element_size() for p in model.parameters())
        with torch.no_grad():
            logits = model.eval()(ref["tokens"])
        res = {"local_bytes": local, "peak_growth_bytes": (peak - before) * 1024,
               "logits_diff": (logits - ref["logits"]).abs().max().item()}
        with open(os.path.join(out, f"{os.path.basename(path)}-rank{rank}.json"), "w") as f:
            json.dump(res, f)
        del model, weights, logits
        # Give the freed heap back to the system, so that the next load cannot reuse it unmeasured.
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    dist.destroy_process_group()


if __name__ == "__main__":  # under torchrun
    rank_main(*sys.argv[1:])


def test_each_rank_reads_the_rows_fsdp2_gives_it_also_when_they_do_not_divide_evenly():
    """shard_rows against torch.chunk, which FSDP2's dim-0 Shard follows: every n (a vocabulary of 32001, 5 rows on
    4 ranks, fewer rows than ranks), the ranks' rows in order and together all of them."""
    from longlora.shard import shard_rows

    for n, world in [(32001, 2), (32000, 8), (5, 4), (3, 8), (1, 2), (0, 2), (11008, 3)]:
        pieces = torch.arange(n).chunk(world)
        previous_end = 0
        for rank in range(world):
            start, end = shard_rows(n, rank, world)
            expected = pieces[rank] if rank < len(pieces) else torch.arange(0)
            assert torch.equal(torch.arange(n)[start:end], expected), (n, world, rank)
            # a range the checkpoint readers can use as it is: inside the tensor, never backwards, right after the
            # previous rank's (a rank without rows gets an empty range at the end, not one past it)
            assert previous_end == start <= end <= n, (n, world, rank, start, end)
            previous_end = end
        assert previous_end == n
