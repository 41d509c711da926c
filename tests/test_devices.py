"""longlora/devices.py: the stage rule against a search over every split and on LLaMA2's shapes, a split model against
one device (tokens, logits, perplexity, the CLIs), each layer's weights and KV cache on its stage's device, and the
mistakes a user can make with --devices."""

import functools
import itertools
import json
import random

import pytest
import torch

import lora
import sample
from longlora import eval as ev
from longlora.adapter import load_model, save_adapter
from longlora.cli import UsageError, resolve_device_dtype
from longlora.devices import describe, pipeline, split_layers
from longlora.weights import Weights
from model import Transformer, preset
from test_sample import make_model, run_with_cache


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from a second thread, and two spinning threads on a busy 2-core machine make each
    decoding step many times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------------------------------------------
# The stage rule


def largest_stage(sizes, starts):
    return max(sum(sizes[a:b]) for a, b in zip(starts, starts[1:] + [len(sizes)]))


def test_the_split_makes_the_largest_stage_as_small_as_a_search_over_every_split_does():
    rng = random.Random(0)
    for _ in range(200):
        L = rng.randint(1, 9)
        sizes = [rng.choice([rng.randint(1, 10), rng.randint(1, 1000)]) for _ in range(L)]
        n = rng.randint(1, L)
        starts = split_layers(sizes, n)
        assert len(starts) == n and starts[0] == 0 and all(a < b for a, b in zip(starts, starts[1:] + [L]))
        best = min(largest_stage(sizes, [0, *cut]) for cut in itertools.combinations(range(1, L), n - 1))
        assert largest_stage(sizes, starts) == best, (sizes, n, starts)


@functools.cache
def meta_model(name):
    """(args, the tensors' shapes) of a preset, built on the meta device once."""
    with torch.device("meta"):
        model = Transformer(preset(name))
    return model.args, model.state_dict()


@pytest.mark.parametrize("name,n,starts", [
    ("llama2-70b", 2, [0, 40]), ("llama2-70b", 4, [0, 20, 40, 60]), ("llama2-70b", 8, list(range(0, 80, 10))),
    ("llama2-70b", 3, [0, 27, 54]), ("llama2-13b", 3, [0, 13, 27]), ("llama2-7b", 3, [0, 11, 22])])
def test_llama2_splits_evenly_where_the_layers_divide_and_the_ends_never_get_more_layers(name, n, starts, capsys):
    """The first and last stages also hold the embedding and the head (a third of a 70B layer, two thirds of a 7B one):
    70B on 3 is 27+27+26, 13B on 3 is 13+14+13 (14+13+13 would put 14 layers and the embedding on the first)."""
    args, specs = meta_model(name)
    devices = [f"cuda:{i}" for i in range(n)]
    device_of = pipeline((args, Weights(specs, None)), devices)
    ends = starts[1:] + [args.n_layers]
    assert capsys.readouterr().err == "layers " + ", ".join(f"{a}-{b - 1} on cuda:{i}" for i, (a, b) in
                                                             enumerate(zip(starts, ends))) + "\n"
    for i, (a, b) in enumerate(zip(starts, ends)):
        assert {device_of(f"layers.{j}.feed_forward.w2.weight") for j in range(a, b)} == {f"cuda:{i}"}
    assert device_of("tok_embeddings.weight") == "cuda:0"
    assert device_of("norm.weight") == device_of("output.weight") == f"cuda:{n - 1}"


def test_the_split_is_printed_as_layer_ranges_per_device():
    assert describe([0, 40], 80, ["cuda:0", "cuda:1"]) == "layers 0-39 on cuda:0, 40-79 on cuda:1"
    assert describe([0, 2, 3], 5, ["cpu", "cuda:0", "cuda:1"]) == "layers 0-1 on cpu, 2 on cuda:0, 3-4 on cuda:1"


# ----------------------------------------------------------------------------------------------------
# A split model computes what one device computes


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, sp_model):
    """{"3": a 3-layer model, "5": a 5-layer one} (layers that 2 and 3 devices do not divide), and an adapter of each
    (LoRA on every projection and the head, a trained-looking B, the embeddings and norms, RoPE scaling 2)."""
    dirs = {}
    for n_layers in (3, 5):
        d = tmp_path_factory.mktemp(f"split{n_layers}")
        make_model(seed=n_layers, vocab_size=512, n_layers=n_layers).save_pretrained(str(d / "base"), tokenizer_path=sp_model)
        model = Transformer.from_pretrained(str(d / "base"))
        lora.apply_lora(model, r=4, alpha=8, targets=lora.TARGETS)
        lora.mark_trainable(model)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.requires_grad:
                    p.add_(0.2 * torch.randn_like(p))
        model.args.rope_scaling = 2.0
        save_adapter(model, str(d / "adapter"), ctx=256)
        dirs[str(n_layers)] = (str(d / "base"), str(d / "adapter"))
    return dirs


SPLITS = [("3", ["cpu", "cpu"]), ("5", ["cpu", "cpu", "cpu"])]  # layers that the devices do not divide


@pytest.mark.parametrize("layers,devices,adapter", [(*SPLITS[0], False), (*SPLITS[1], True)])
def test_a_split_model_generates_one_devices_tokens_and_logits_with_every_cache(model_dirs, layers, devices, adapter):
    base, adapter_dir = model_dirs[layers]
    one = load_model(base, adapter_dir if adapter else None)
    split = load_model(base, adapter_dir if adapter else None, device=devices)
    ids = torch.randint(0, 512, (2, 50), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(split(ids), one(ids))
    prompt = ids[0, :40].tolist()
    for kind in ("full", "h2o", "sink"):  # budgets of 16 < 40 + 24: both evicting caches evict
        kw = dict(cache=kind, heavy=8, recent=8, prefill_chunk=16)
        assert list(generate_greedy(split, prompt, **kw)) == list(generate_greedy(one, prompt, **kw)), kind
        logits = [run_with_cache(m, ids[:, :44], sample.make_cache(m, kind, 40, 4, heavy=8, recent=8, batch_size=2), 40, 16)
                  for m in (split, one)]
        assert torch.equal(*logits), kind


def generate_greedy(model, prompt, **kw):
    return sample.generate(model, prompt, 24, temperature=0.0, **kw)


@pytest.mark.parametrize("layers,devices", [*SPLITS, ("3", ["cpu", "cpu", "cpu"])])  # and one layer per device
def test_a_split_model_gives_one_devices_perplexity(model_dirs, layers, devices):
    base, adapter_dir = model_dirs[layers]
    tokens = torch.randint(0, 512, (400,), generator=torch.Generator().manual_seed(1)).numpy()
    one = ev.perplexity(load_model(base, adapter_dir), tokens, 64, 32, batch_size=2)
    split = ev.perplexity(load_model(base, adapter_dir, device=devices), tokens, 64, 32, batch_size=2)
    assert split["loss"] == one["loss"]


def test_each_layers_weights_and_kv_caches_live_on_its_stages_device(model_dirs):
    """The meta device stands in for a second GPU: a split over cpu and meta puts every tensor of the last stage
    (its layer's weights and LoRA matrices, the final norm and the head) on meta and the rest on the CPU, and a
    forward through each cache then mixes devices nowhere an elementwise operation would refuse it (the activations,
    RoPE's angles and the caches' bookkeeping follow each layer), leaving each layer's cache tensors beside its
    weights. (Meta kernels check devices less strictly than CUDA's: matrix products accept a mix.)"""
    base, adapter_dir = model_dirs["3"]
    model = load_model(base, adapter_dir, device=["cpu", "meta"])  # layers 0-1 on cpu, 2 on meta
    for name, p in model.named_parameters():
        on_meta = name.startswith(("layers.2.", "norm.", "output."))
        assert p.device.type == ("meta" if on_meta else "cpu"), name
    ids = torch.randint(0, 512, (1, 30))
    for kind in ("full", "h2o", "sink"):
        cache = sample.make_cache(model, kind, 20, 10, heavy=4, recent=4)
        logits = run_with_cache(model, ids, cache, prefill=20, chunk=7)  # evicting caches evict: budget 8 < 30
        assert logits.device.type == "meta" and logits.shape == (1, 30, 512)
        held = {field: tensors for field, tensors in vars(cache).items() if isinstance(tensors, list)}
        assert held and all(len(tensors) == 3 for tensors in held.values())
        for field, tensors in held.items():
            assert [t.device.type for t in tensors] == ["cpu", "cpu", "meta"], (kind, field)


# ----------------------------------------------------------------------------------------------------
# The command lines


def test_sample_and_eval_with_devices_print_the_split_and_give_one_devices_output(model_dirs, tmp_path, capsys):
    base, adapter_dir = model_dirs["5"]
    outputs = []
    for where in (["--device", "cpu"], ["--devices", "cpu,cpu,cpu"]):
        argv = ["--model", base, "--adapter", adapter_dir, "--prompt", "def main(argv=None):", "--max-new-tokens", "12",
                "--temperature", "0.8", "--seed", "3", "--kv-cache", "h2o", "--heavy", "4", "--recent", "4", *where]
        assert sample.main(argv) == 0
        out, err = capsys.readouterr()
        outputs.append(out)
        assert err.count("layers ") == (where[0] == "--devices")
        assert ("layers 0-1 on cpu, 2-3 on cpu, 4 on cpu\n" in err) == (where[0] == "--devices")
        (tmp_path / "doc.txt").write_text("import argparse\n" * 200)
        for task in (["ppl", "--data", str(tmp_path / "doc.txt"), "--seq-lens", "32,64", "--stride", "16"],
                     ["passkey", "--lengths", "180,200", "--trials", "2"]):
            result = tmp_path / f"{task[0]}{where[0]}.json"
            assert ev.main([*task, "--model", base, "--adapter", adapter_dir, *where, "--out", str(result)]) == 0
            outputs.append({k: v for k, v in json.loads(result.read_text()).items() if k != "results"})
            outputs.append([{k: v for k, v in row.items() if k != "seconds"} for row in outputs[-1].get("results", [])])
            assert capsys.readouterr().err.count("layers 0-1 on cpu, 2-3 on cpu, 4 on cpu\n") == (where[0] == "--devices")
    assert outputs[0].strip() and outputs[:5] == outputs[5:]


@pytest.mark.parametrize("case,argv,words", [
    ("both flags", ["--device", "cpu", "--devices", "cpu,cpu"], ["--devices", "not allowed with", "--device"]),
    ("one device", ["--devices", "cpu"], ["--devices must be two or more", "cuda:0,cuda:1"]),
    ("an empty entry", ["--devices", "cpu,,cpu"], ["--devices must be two or more"]),
    ("no such device", ["--devices", "cpu,gpu"], ["--devices gpu: expected cpu, cuda, cuda:N or mps"]),
    ("more devices than layers", ["--devices", "cpu,cpu,cpu,cpu"], ["4 devices for a model of 3 layers", "at most 3"]),
])
def test_a_mistake_with_devices_is_one_error_line(model_dirs, capsys, case, argv, words):
    base, _ = model_dirs["3"]
    for main, task in ((sample.main, ["--prompt", "hi there"]), (ev.main, ["passkey", "--lengths", "180"])):
        assert main([*task, "--model", base, *argv]) == 2, case
        out, err = capsys.readouterr()
        assert err.count("\n") == 1 and err.startswith("error: ") and all(w in err for w in words), (case, err)
        assert "layers " not in out + err  # refused before the split is planned or anything loads


def test_a_gpu_the_machine_lacks_is_named_with_the_ones_it_has(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(UsageError, match=r"^--devices cuda:7: this machine has 2 CUDA device\(s\), cuda:0 \.\. cuda:1$"):
        resolve_device_dtype(["cuda:0", "cuda:7"], "auto")
    assert resolve_device_dtype(["cuda:0", "cuda:1"], "auto")[1] == torch.bfloat16  # auto: bf16 when all are GPUs
    assert resolve_device_dtype(["cuda:0", "cpu"], "auto")[1] == torch.float32


def test_a_model_whose_head_is_its_embedding_is_not_split():
    args = preset("tiny", tie_embeddings=True)
    with torch.device("meta"):
        specs = {k: v for k, v in Transformer(args).state_dict().items() if k != "output.weight"}
    with pytest.raises(ValueError, match="tied"):
        pipeline((args, Weights(specs, None)), ["cpu", "cpu"])
