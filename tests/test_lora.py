"""lora.py: LoRA layers, what trains, merge, adapter files, and exports checked by independent readers
(HF transformers' LlamaForCausalLM for the merged model, peft's PeftModel for the PEFT adapter)."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import ROOT
from longlora.export import main
from longlora.adapter import load_adapter, save_adapter
from lora import LoRALinear, apply_lora, lora_modules, mark_trainable, merge_lora, trainable_summary
from model import ModelArgs, RMSNorm, Transformer

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # transformers/peft must never reach for the network here
import transformers  # noqa: E402  test requirement, the independent reference
import peft  # noqa: E402  test requirement, the independent reference

MERGE_TOL = 1e-5  # merged vs unmerged, fp32 (observed 4e-6: (W + s·B·A)·x rounds differently from W·x + s·B·(A·x))
HF_TOL = 1e-4  # ours vs transformers / peft in fp32 (observed 4e-6 to 6e-6; different op order)
ALL_TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3", "output")

# A tiny LLaMA with grouped-query attention (the wk permutation must use n_kv_heads) and a base context of
# 64 positions; the adapters extend it 4x to 256 with linear RoPE scaling.
BASE = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=32, max_seq_len=64, rope_theta=10000.0)
FACTOR, CTX = 4.0, 256


def randomize_(model, seed):
    """Make every tensor matter: norms away from 1, weights 5x GPT init (larger ones make fp32 rounding chaotic)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g).to(p.dtype)
            p.copy_(1 + 0.3 * noise if n.endswith("norm.weight") else 0.1 * noise)


def fake_finetune_(model, seed):
    """A stand-in for training: nonzero B (A is already random), changed embedding and norms."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in lora_modules(model):
            m.lora_b.copy_(0.1 * torch.randn(m.lora_b.shape, generator=g))
        if model.lora_config["embed"]:
            model.tok_embeddings.weight.add_(0.1 * torch.randn(model.tok_embeddings.weight.shape, generator=g))
        if model.lora_config["norms"]:
            for m in model.modules():
                if isinstance(m, RMSNorm):
                    m.weight.add_(0.1 * torch.randn(m.weight.shape, generator=g))


def tokens(B, T, seed=1, vocab=BASE["vocab_size"]):
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, sp_model):
    """A random base checkpoint in this project's layout, with a tokenizer."""
    torch.manual_seed(0)
    model = Transformer(ModelArgs(**BASE))
    randomize_(model, seed=0)
    d = tmp_path_factory.mktemp("base")
    model.save_pretrained(str(d), tokenizer_path=sp_model)
    return str(d)


def finetuned(base_dir, targets=("wq", "wk", "wv", "wo"), seed=3):
    """base + LoRA (+ embed + norms), context extended 4x, 'trained' by fake_finetune_."""
    model = Transformer.from_pretrained(base_dir, rope_scaling=FACTOR, max_seq_len=CTX)
    apply_lora(model, r=4, alpha=8, targets=targets)
    mark_trainable(model)
    fake_finetune_(model, seed)
    return model.eval()


@pytest.fixture(scope="module")
def adapter_dir(base_dir, tmp_path_factory):
    """An adapter on every linear layer (so every name mapping of the exports is exercised)."""
    model = finetuned(base_dir, targets=ALL_TARGETS)
    d = tmp_path_factory.mktemp("adapter")
    save_adapter(model, str(d), ctx=CTX, extra={"note": "test"})
    with torch.no_grad():
        logits = model(tokens(2, 200))
    return str(d), logits  # the fine-tuned model's logits on 200 tokens (> 64: the RoPE scaling matters)


# ----------------------------------------------------------------------------------------------------
# The layer and what trains


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fresh_lora_model_gives_exactly_the_base_logits(base_dir, dtype):
    model = Transformer.from_pretrained(base_dir, dtype=dtype)  # built on the meta device, assign=True
    x = tokens(2, 32)
    with torch.no_grad():
        ref = model(x)
        apply_lora(model, targets=ALL_TARGETS)
        out = model(x)
    assert out.dtype == dtype
    assert torch.equal(out, ref)
    lin = model.layers[0].attention.wq
    assert isinstance(lin, LoRALinear)
    # LoRA parameters live next to the base weight, in fp32 (they are what the optimizer updates)
    assert lin.lora_a.device == lin.weight.device and lin.lora_a.dtype == torch.float32
    assert lin.weight.dtype == dtype
    assert lin.lora_a.shape == (8, 64) and lin.lora_b.shape == (64, 8)
    assert lin.lora_a.abs().max() > 0 and lin.lora_a.abs().max() <= 1 / 64 ** 0.5  # Kaiming-uniform(a=√5) bound
    # the state-dict key of the frozen weight is unchanged
    assert "layers.0.attention.wq.weight" in model.state_dict()


def test_lora_layer_computes_w_x_plus_scaled_b_a_x():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(6, 5))
    lin = LoRALinear(w, r=2, alpha=6)
    torch.nn.init.normal_(lin.lora_b)
    x = torch.randn(3, 5)
    expected = x @ w.T + 3.0 * (x @ lin.lora_a.T @ lin.lora_b.T)  # alpha / r = 3
    assert torch.allclose(lin(x), expected, atol=1e-6)


def test_lora_on_a_biased_projection_adds_the_update_to_the_frozen_bias_and_a_merge_keeps_the_bias():
    """Qwen2's q, k and v: y = W·x + b + (α/r)·B·A·x; b stays frozen in the base and out of the adapter, and the
    merged state dict (W + (α/r)·B·A, b unchanged) gives a plain biased model the same logits."""
    torch.manual_seed(0)
    w, bias = torch.nn.Parameter(torch.randn(6, 5)), torch.nn.Parameter(torch.randn(6))
    lin = LoRALinear(w, r=2, alpha=6, bias=bias)
    torch.nn.init.normal_(lin.lora_b)
    x = torch.randn(3, 5)
    assert torch.allclose(lin(x), x @ w.T + bias + 3.0 * (x @ lin.lora_a.T @ lin.lora_b.T), atol=1e-6)
    model = Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=100, multiple_of=32,
                                  qkv_bias=True)).eval()
    biases = {k: v.clone() for k, v in model.state_dict().items() if k.endswith("bias")}
    assert len(biases) == 6  # wq, wk, wv of two layers; wo has none
    apply_lora(model, r=2, alpha=4, targets=("wq", "wk", "wv", "wo"))
    mark_trainable(model)
    assert not any(p.requires_grad for n, p in model.named_parameters() if n.endswith("bias"))
    from lora import adapter_state
    assert not [k for k in adapter_state(model) if k.endswith("bias")]
    for _, m in lora_modules(model):
        torch.nn.init.normal_(m.lora_b)
    merged = merge_lora(model.state_dict(), model.lora_config)
    assert all(torch.equal(merged[k], v) for k, v in biases.items())
    plain = Transformer(model.args).eval()
    plain.load_state_dict(merged, strict=True)
    tokens = torch.randint(0, 100, (2, 12))
    with torch.no_grad():
        assert (plain(tokens) - model(tokens)).abs().max().item() <= 1e-5


def test_dropout_touches_only_the_lora_branch():
    torch.manual_seed(0)
    lin = LoRALinear(torch.nn.Parameter(torch.randn(6, 5)), r=2, alpha=4, dropout=0.9).train()
    x = torch.randn(50, 5)
    assert torch.equal(lin(x), x @ lin.weight.T)  # B = 0: dropout on x would have to show up here otherwise
    torch.nn.init.normal_(lin.lora_b)
    assert not torch.allclose(lin(x), lin(x))  # the LoRA branch is random in training
    lin.eval()
    assert torch.allclose(lin(x), x @ lin.weight.T + 2 * x @ lin.lora_a.T @ lin.lora_b.T, atol=1e-5)


@pytest.mark.parametrize("embed,norms", [(True, True), (False, False)])
def test_mark_trainable_counts_and_trains_only_the_lora_embed_and_norm_params(base_dir, embed, norms):
    model = Transformer.from_pretrained(base_dir)
    apply_lora(model)
    n_trainable, n_total = mark_trainable(model, embed=embed, norms=norms)
    args = model.args
    # the count, from the shapes alone: each of wq wk wv wo adds r·(in + out)
    kv = args.n_kv_heads * args.head_dim
    lora = args.n_layers * 8 * ((64 + 64) + (64 + kv) + (64 + kv) + (64 + 64))
    expected = lora + embed * args.vocab_size * args.dim + norms * (2 * args.n_layers + 1) * args.dim
    assert n_trainable == expected
    assert n_total == sum(p.numel() for p in model.parameters())
    assert trainable_summary(model).endswith(f"({100 * expected / n_total:.2f}%)")

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)  # all of them: freezing must hold anyway
    for step in range(3):
        x = tokens(2, 33, seed=10 + step)
        loss = model(x[:, :-1], x[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    for n, p in model.named_parameters():
        should_train = (n.endswith(("lora_a", "lora_b")) or (embed and n == "tok_embeddings.weight")
                        or (norms and n.endswith("norm.weight")))
        changed = not torch.equal(p, before[n])
        assert changed == should_train, f"{n}: changed={changed}, should train={should_train}"


# ----------------------------------------------------------------------------------------------------
# Merge


def test_merged_equals_unmerged_and_loads_strictly_into_a_plain_model(base_dir):
    model = finetuned(base_dir, targets=ALL_TARGETS)
    state = model.state_dict()
    snapshot = {k: v.clone() for k, v in state.items()}
    merged = merge_lora(state, model.lora_config)
    assert all(torch.equal(state[k], snapshot[k]) for k in state)  # pure: the input is untouched
    assert not any("lora" in k for k in merged)
    plain = Transformer(model.args)
    plain.load_state_dict(merged, strict=True)
    x = tokens(2, 100)
    with torch.no_grad():
        ours, theirs = model(x), plain(x)
    assert (ours - theirs).abs().max().item() <= MERGE_TOL
    # the merge changed every targeted weight, and nothing else
    for k in merged:
        targeted = k.endswith(tuple(f"{t}.weight" for t in ALL_TARGETS))
        assert torch.equal(merged[k], state[k]) != targeted, k


def test_merge_is_fp32_math_cast_back_to_the_weight_dtype():
    w = torch.randn(16, 8).to(torch.bfloat16)
    a, b = torch.randn(2, 8), torch.randn(16, 2)
    merged = merge_lora({"x.weight": w, "x.lora_a": a, "x.lora_b": b}, 0.5)["x.weight"]
    assert merged.dtype == torch.bfloat16
    assert torch.equal(merged, (w.double() + 0.5 * (b.double() @ a.double())).float().to(torch.bfloat16))


def test_merge_refuses_a_missing_a_mismatched_or_a_stray_lora_matrix_and_lora_on_a_tied_head():
    w, a, b = torch.randn(16, 8), torch.randn(2, 8), torch.randn(16, 2)
    with pytest.raises(ValueError, match="lora_b is missing"):
        merge_lora({"x.weight": w, "x.lora_a": a}, 0.5)
    with pytest.raises(ValueError, match="cannot merge x.weight"):  # ranks 2 and 3
        merge_lora({"x.weight": w, "x.lora_a": a, "x.lora_b": torch.randn(16, 3)}, 0.5)
    with pytest.raises(ValueError, match="cannot merge x.weight"):  # B·A would be (8, 16)
        merge_lora({"x.weight": w, "x.lora_a": torch.randn(2, 16), "x.lora_b": torch.randn(8, 2)}, 0.5)
    with pytest.raises(ValueError, match="y.lora_a has no base weight"):
        merge_lora({"x.weight": w, "y.lora_a": a, "y.lora_b": b}, 0.5)
    # a tied output head is the embedding: LoRA on it would change the input side too
    tied = Transformer(ModelArgs(**{**BASE, "tie_embeddings": True}))
    with pytest.raises(ValueError, match="cannot put LoRA on `output` when it is tied"):
        apply_lora(tied, targets=("wq", "output"))


# ----------------------------------------------------------------------------------------------------
# Adapter files


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_adapter_round_trip_reproduces_the_finetuned_logits_exactly(base_dir, tmp_path, dtype):
    model = Transformer.from_pretrained(base_dir, dtype=dtype, rope_scaling=FACTOR, max_seq_len=CTX)
    apply_lora(model, r=4, alpha=8)
    mark_trainable(model)
    fake_finetune_(model, seed=5)
    save_adapter(model, str(tmp_path), ctx=CTX, extra={"lr": 2e-5})
    assert sorted(os.listdir(tmp_path)) == ["adapter.safetensors", "adapter_config.json"]
    cfg = json.load(open(tmp_path / "adapter_config.json"))
    assert (cfg["r"], cfg["alpha"], cfg["targets"], cfg["embed"], cfg["norms"]) == (4, 8, ["wq", "wk", "wv", "wo"], True, True)
    assert (cfg["rope_scaling"], cfg["max_seq_len"], cfg["extra"]) == (FACTOR, CTX, {"lr": 2e-5})
    assert cfg["base"]["dim"] == 64 and cfg["base"]["n_kv_heads"] == 2
    saved = load_file(str(tmp_path / "adapter.safetensors"))
    assert "tok_embeddings.weight" in saved and "norm.weight" in saved and "output.weight" not in saved
    assert not any(k.endswith(("wq.weight", "w1.weight")) for k in saved)  # the frozen base is not in an adapter

    fresh = Transformer.from_pretrained(base_dir, dtype=dtype)  # plain base: no scaling, base context
    assert fresh.args.rope_scaling == 1.0
    load_adapter(fresh, str(tmp_path))
    assert (fresh.args.rope_scaling, fresh.args.max_seq_len) == (FACTOR, CTX)
    x = tokens(2, 150)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_an_adapter_of_an_fp32_base_loads_on_it_in_any_dtype_with_close_logits(base_dir, adapter_dir, dtype):
    """The base check compares the checkpoint's stored weights, not the loaded copy: rounded to fp16 first,
    some of this base's values round to other bf16 values than they do at once, which once made an fp16 load
    look like another base."""
    from longlora.adapter import base_fingerprint, load_model

    adapter, logits = adapter_dir
    model = load_model(base_dir, adapter, dtype=dtype)
    if dtype == torch.float16:  # the case is there: the loaded copy's fingerprint differs from the stored one's
        plain = Transformer.from_pretrained(base_dir, dtype=dtype)
        stored = Transformer.from_pretrained(base_dir)
        assert (base_fingerprint(plain.state_dict().__getitem__, BASE["n_layers"])
                != base_fingerprint(stored.state_dict().__getitem__, BASE["n_layers"]))
    with torch.no_grad():
        out = model(tokens(2, 200)).float()
    assert (out - logits).abs().max().item() < {torch.float16: 0.05, torch.bfloat16: 0.25}[dtype]  # logits up to 4.2


def test_adapter_that_does_not_fit_the_base_is_refused(base_dir, adapter_dir, tmp_path):
    adapter, _ = adapter_dir

    def refused(model, path, match):
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(ValueError, match=match) as e:
            load_adapter(model, path)
        assert "\n" not in str(e.value)
        after = model.state_dict()  # a refused adapter leaves the model as it was
        assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
        assert model.args.rope_scaling == 1.0

    # other shapes
    refused(Transformer(ModelArgs(**{**BASE, "dim": 32})), adapter, "dim=64")
    refused(Transformer(ModelArgs(**{**BASE, "n_layers": 3})), adapter, "n_layers=2")
    refused(Transformer(ModelArgs(**{**BASE, "vocab_size": 300})), adapter, "vocab_size=512")
    # the model already carries LoRA on other targets
    other = Transformer.from_pretrained(base_dir)
    apply_lora(other, r=4, alpha=8, targets=("wq", "wv"))
    refused(other, adapter, "targets")
    # a tensor missing from, or foreign to, the file
    state = load_file(os.path.join(adapter, "adapter.safetensors"))
    for name, edit in [("missing", lambda s: s.pop("layers.1.attention.wk.lora_b")),
                       ("unexpected", lambda s: s.update({"layers.0.attention.wq.bias": torch.zeros(64)}))]:
        d = tmp_path / name
        d.mkdir()
        s = dict(state)
        edit(s)
        save_file(s, str(d / "adapter.safetensors"))
        (d / "adapter_config.json").write_text(open(os.path.join(adapter, "adapter_config.json")).read())
        refused(Transformer.from_pretrained(base_dir), str(d), f"{name} tensor")


# ----------------------------------------------------------------------------------------------------
# Exports, read back by independent implementations


def hf_logits(model, x):
    with torch.no_grad():
        return model(x).logits


def test_hf_export_loads_in_transformers_with_equal_logits_and_rope_scaling(base_dir, adapter_dir, tmp_path):
    adapter, ours = adapter_dir
    out = tmp_path / "hf"
    assert main(["merge", "--base", base_dir, "--adapter", adapter, "--out", str(out), "--shard-size", "100KB"]) == 0
    cfg = json.load(open(out / "config.json"))
    # HF's convention: max_position_embeddings the pre-training context, x factor the context
    assert cfg["rope_scaling"] == {"type": "linear", "factor": FACTOR} and cfg["max_position_embeddings"] == BASE["max_seq_len"]
    assert "original_max_position_embeddings" not in cfg and BASE["max_seq_len"] * FACTOR == CTX
    back = Transformer.from_pretrained(str(out)).args  # our export reads back unchanged
    assert (back.rope_scaling, back.max_seq_len, back.original_max_seq_len) == (FACTOR, CTX, BASE["max_seq_len"])
    assert cfg["rope_theta"] == BASE["rope_theta"]
    index = json.load(open(out / "model.safetensors.index.json"))
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((out / s).exists() for s in shards)
    assert open(out / "tokenizer.model", "rb").read() == open(os.path.join(base_dir, "tokenizer.model"), "rb").read()
    assert not any(n.endswith(".tmp") or ".tmp." in n for n in os.listdir(out))

    hf = transformers.LlamaForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    x = tokens(2, 200)
    assert (hf_logits(hf, x) - ours).abs().max().item() <= HF_TOL
    # The scaling is what makes them agree: without it, positions 64..199 look different.
    cfg["rope_scaling"], cfg["rope_parameters"] = None, {"rope_type": "default", "rope_theta": BASE["rope_theta"]}
    (out / "config.json").write_text(json.dumps(cfg))
    unscaled = transformers.LlamaForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    assert (hf_logits(unscaled, x) - ours).abs().max().item() > 100 * HF_TOL


def test_reexport_with_overwrite_leaves_no_stale_shards(base_dir, adapter_dir, tmp_path):
    adapter, ours = adapter_dir
    out = str(tmp_path / "hf")
    assert main(["merge", "--base", base_dir, "--adapter", adapter, "--out", out, "--shard-size", "100KB"]) == 0
    assert len([n for n in os.listdir(out) if n.startswith("model-")]) > 1
    assert main(["merge", "--base", base_dir, "--adapter", adapter, "--out", out, "--overwrite"]) == 0  # now one file
    assert sorted(n for n in os.listdir(out) if n != ".longlora.lock") == ["config.json", "model.safetensors", "tokenizer.model"]
    with torch.no_grad():
        assert (Transformer.from_pretrained(out)(tokens(2, 200)) - ours).abs().max().item() <= MERGE_TOL


@pytest.mark.parametrize("fmt", ["meta", "own"])
def test_meta_and_own_exports_load_back_with_the_rope_scaling(base_dir, adapter_dir, tmp_path, fmt):
    adapter, ours = adapter_dir
    out = tmp_path / fmt
    assert main(["merge", "--base", base_dir, "--adapter", adapter, "--out", str(out), "--format", fmt]) == 0
    expected = {"meta": ["consolidated.00.pth", "params.json", "tokenizer.model"],
                "own": ["model.safetensors", "params.json", "tokenizer.model"]}[fmt]
    assert sorted(n for n in os.listdir(out) if n != ".longlora.lock") == expected
    model = Transformer.from_pretrained(str(out)).eval()
    assert (model.args.rope_scaling, model.args.max_seq_len, model.args.original_max_seq_len) == (FACTOR, CTX, BASE["max_seq_len"])
    with torch.no_grad():
        assert (model(tokens(2, 200)) - ours).abs().max().item() <= MERGE_TOL


def test_peft_export_loads_in_peft_with_equal_logits(base_dir, adapter_dir, tmp_path):
    adapter, ours = adapter_dir
    # The HF base: the unmodified base checkpoint in HF layout (q/k rows in HF's order), read by transformers.
    from longlora.weights import read_checkpoint, write_hf
    args, weights = read_checkpoint(base_dir, ModelArgs)
    write_hf(args, weights.read(list(weights.specs)), str(tmp_path / "base-hf"))
    out = tmp_path / "peft"
    assert main(["peft", "--base", base_dir, "--adapter", adapter, "--out", str(out)]) == 0
    cfg = json.load(open(out / "adapter_config.json"))
    assert cfg["modules_to_save"] == ["embed_tokens", "input_layernorm", "post_attention_layernorm", "norm"]
    keys = load_file(str(out / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.lm_head.lora_B.weight" in keys and "base_model.model.model.embed_tokens.weight" in keys

    # The recipe the CLI prints: the base loaded with the exported config (RoPE scaling, context), then the adapter.
    config = transformers.AutoConfig.from_pretrained(str(out))
    hf_base = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "base-hf"), config=config, dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(hf_base, str(out)).eval()
    assert (hf_logits(model, tokens(2, 200)) - ours).abs().max().item() <= HF_TOL


def test_cli_bad_input_is_one_line_and_exit_2(base_dir, adapter_dir, tmp_path, capsys):
    adapter, _ = adapter_dir
    wrong_base = tmp_path / "wrong-base"
    Transformer(ModelArgs(**{**BASE, "n_layers": 1})).save_pretrained(str(wrong_base))
    cases = [
        (["merge", "--base", base_dir, "--adapter", str(tmp_path / "nope"), "--out", str(tmp_path / "o1")], "no such adapter"),
        (["merge", "--base", str(wrong_base), "--adapter", adapter, "--out", str(tmp_path / "o2")], "n_layers=2"),
        (["merge", "--base", base_dir, "--adapter", adapter, "--out", str(tmp_path / "o3"), "--shard-size", "big"], "size"),
        (["peft", "--base", base_dir, "--adapter", adapter, "--out", adapter], "write to a new path"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error:") and message in err and err.count("\n") == 1, err
    assert not any((tmp_path / o).exists() for o in ("o1", "o2", "o3"))  # nothing half-written
    # the same through a real process: exit status 2, one line, no traceback
    r = subprocess.run([sys.executable, os.path.join(ROOT, "lora.py"), *cases[1][0]], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and r.stderr.startswith("error:") and r.stderr.count("\n") == 1, r.stderr


# ----------------------------------------------------------------------------------------------------
# Import: a PEFT adapter + trainable_params.bin, made the way LongLoRA's fine-tune.py makes them

V = 300  # the tiny HF base's vocabulary; LongLoRA's checkpoint has V + 1 ([PAD])
HF_KW = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=V, max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=False)


def write_longlora(d, serialization):
    """(PEFT model as the independent reference, base dir, LongLoRA-style adapter dir), written by peft itself."""
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**HF_KW))
    randomize_(hf, seed=1)
    hf.save_pretrained(d / "base")  # LLaMA2's role: HF layout, 64 positions, no RoPE scaling
    # fine-tune.py: factor ceil(256 / 64) = 4 into the config, then a [PAD] token with mean-initialised rows
    config = transformers.LlamaConfig(**HF_KW, rope_scaling={"type": "linear", "factor": 4.0})
    model = transformers.LlamaForCausalLM.from_pretrained(d / "base", config=config, dtype=torch.float32)
    model.resize_token_embeddings(V + 1)
    with torch.no_grad():
        for emb in (model.get_input_embeddings(), model.get_output_embeddings()):
            emb.weight[-1] = emb.weight[:-1].mean(0)
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], lora_dropout=0.0,
                           bias="none", task_type="CAUSAL_LM")
    model = peft.get_peft_model(model, lora)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():  # "training": B away from zero, embeddings and norms changed
        for n, p in model.named_parameters():
            if "lora_B" in n or "embed" in n or "norm" in n:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    out = d / "peft"
    model.save_pretrained(out, safe_serialization=serialization == "safetensors")
    # get_trainable_weights.py: the tensors named "embed" or "norm", "base_model.model." cut
    trainable = {k.replace("base_model.model.", ""): v for k, v in model.state_dict().items() if "embed" in k or "norm" in k}
    torch.save(trainable, out / "trainable_params.bin")
    return model.eval(), str(d / "base"), str(out)


@pytest.fixture(scope="module", params=["safetensors", "bin"])
def longlora_dir(request, tmp_path_factory):
    return write_longlora(tmp_path_factory.mktemp("longlora"), request.param)


def test_longlora_peft_adapter_imports_with_the_logits_of_the_peft_model(longlora_dir, tmp_path, capsys):
    reference, base, peft_dir = longlora_dir
    out = tmp_path / "imported"
    assert main(["import", "--peft", peft_dir, "--base", base, "--ctx", "256", "--out", str(out)]) == 0
    assert "dropped embedding row 300" in capsys.readouterr().out
    cfg = json.load(open(out / "adapter_config.json"))
    assert (cfg["r"], cfg["alpha"], cfg["targets"], cfg["embed"], cfg["norms"]) == (4, 8, ["wq", "wk", "wv", "wo"], True, True)
    assert (cfg["rope_scaling"], cfg["max_seq_len"]) == (4.0, 256)
    x = tokens(2, 200, vocab=V)  # 200 > 64 positions: the RoPE factor matters
    full = hf_logits(reference, x)  # (2, 200, V + 1)
    ref = full[..., :V]  # the [PAD] logit is what the import drops
    # ... which moves each real token's log-probability by at most log((V+1)/V): the pad row is the mean row
    shift = ref.log_softmax(-1) - full.log_softmax(-1)[..., :V]
    assert shift.min() >= 0 and shift.max() <= torch.log(torch.tensor((V + 1) / V)) + 1e-6
    from longlora.adapter import load_model
    model = load_model(base, str(out))  # what sample.py --adapter, eval and lora.py merge do
    with torch.no_grad():
        assert (model(x) - ref).abs().max().item() <= HF_TOL
    merged = tmp_path / "merged"  # and `merge` takes it
    assert main(["merge", "--base", base, "--adapter", str(out), "--out", str(merged)]) == 0
    with torch.no_grad():
        assert (Transformer.from_pretrained(str(merged))(x) - ref).abs().max().item() <= HF_TOL


def test_a_released_config_json_gives_the_context_and_one_without_rope_scaling_asks_for_ctx(longlora_dir, tmp_path,
                                                                                           capsys):
    """LongLoRA's released LoRA repositories ship the fine-tuned config.json (max_position_embeddings of the base and
    the linear factor): the context is read from it; where it lacks rope_scaling (dvlab-research/LongLoRA#181), --ctx is asked
    for instead of importing as if the adapter had trained at the base's context."""
    _, base, peft_dir = longlora_dir
    repo = tmp_path / "repo"
    shutil.copytree(peft_dir, repo)
    transformers.LlamaConfig(**HF_KW, rope_scaling={"type": "linear", "factor": 4.0}).save_pretrained(repo)
    assert main(["import", "--peft", str(repo), "--base", base, "--out", str(tmp_path / "a")]) == 0
    cfg = json.load(open(tmp_path / "a" / "adapter_config.json"))
    assert (cfg["rope_scaling"], cfg["max_seq_len"]) == (4.0, 256)
    config = json.load(open(repo / "config.json"))
    for key in ("rope_scaling", "rope_parameters"):
        config.pop(key, None)
    (repo / "config.json").write_text(json.dumps(config))
    capsys.readouterr()
    assert main(["import", "--peft", str(repo), "--base", base, "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "records no RoPE scaling" in err and "pass --ctx" in err
    assert not (tmp_path / "b").exists()


def test_our_peft_export_imports_back_to_the_same_adapter(base_dir, adapter_dir, tmp_path):
    adapter, ours = adapter_dir  # LoRA on every linear layer, lm_head included; embeddings and norms
    assert main(["peft", "--base", base_dir, "--adapter", adapter, "--out", str(tmp_path / "peft")]) == 0
    # no --ctx: the config.json the export wrote holds the context
    assert main(["import", "--peft", str(tmp_path / "peft"), "--base", base_dir, "--out", str(tmp_path / "back")]) == 0
    a, b = load_file(os.path.join(adapter, "adapter.safetensors")), load_file(str(tmp_path / "back" / "adapter.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # q/k rows of B permuted back exactly


class Boom:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # unpickling would create the marker file
        return (open, (self.marker, "w"))


def test_import_of_bad_input_is_one_line_and_exit_2(base_dir, tmp_path, capsys):
    _, base, peft_dir = write_longlora(tmp_path, "bin")
    capsys.readouterr()  # drop what building it printed (HF's progress bars)
    import shutil

    def copy(name, edit):
        d = tmp_path / name
        shutil.copytree(peft_dir, d)
        edit(d)
        return str(d)

    marker = tmp_path / "pwned"
    unsafe = copy("unsafe", lambda d: torch.save({"x": Boom(str(marker))}, d / "trainable_params.bin"))
    no_weights = copy("no-weights", lambda d: [os.remove(f) for f in d.glob("adapter_model.*")])
    no_config = copy("no-config", lambda d: os.remove(d / "adapter_config.json"))

    def train_lm_head(d):  # recent PEFT saves lm_head whole after a resize; a changed one cannot go in an adapter
        state = torch.load(d / "adapter_model.bin", weights_only=True)
        state["base_model.model.lm_head.weight"] = state["base_model.model.lm_head.weight"] + 0.1
        torch.save(state, d / "adapter_model.bin")
    trained_head = copy("trained-head", train_lm_head)
    out = lambda name: str(tmp_path / name)
    cases = [
        (["--peft", str(tmp_path / "nope"), "--base", base, "--ctx", "256"], "no such directory"),
        (["--peft", no_config, "--base", base, "--ctx", "256"], "no adapter_config.json"),
        (["--peft", no_weights, "--base", base, "--ctx", "256"], "no adapter_model.safetensors or adapter_model.bin"),
        (["--peft", unsafe, "--base", base, "--ctx", "256"], "cannot read it as plain tensors"),
        (["--peft", peft_dir, "--base", base], "pass --ctx"),
        (["--peft", trained_head, "--base", base, "--ctx", "256"], "lm_head.weight differs from the base's"),
        (["--peft", peft_dir, "--base", base_dir, "--ctx", "256"], "has shape (301, 64)"),  # another base
    ]
    for i, (argv, message) in enumerate(cases):
        assert main(["import", *argv, "--out", out(f"o{i}")]) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error:") and message in err and err.count("\n") == 1, err
        assert not os.path.exists(out(f"o{i}"))  # nothing written
    assert not marker.exists()  # the pickle was refused, not run
    # a file in a folder this project did not write is never overwritten (output.check_output); checked through `python lora.py import`, as a process
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "adapter_config.json").write_text("mine")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "lora.py"), "import", "--peft", peft_dir, "--base", base,
                        "--ctx", "256", "--out", str(taken)], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and r.stderr.startswith("error:") and "this project did not write" in r.stderr, r.stderr
    assert r.stderr.count("\n") == 1 and (taken / "adapter_config.json").read_text() == "mine"


def test_an_fp16_and_a_bf16_copy_of_one_base_have_one_fingerprint_and_another_base_another():
    """Meta ships LLaMA2 in bf16, HF in fp16: an adapter trained on one must load on the other. bf16 values below
    fp16's normal range (2**-14) change in fp16; LLaMA-like weights N(0, 0.02) have a few in every sample."""
    from longlora.adapter import base_fingerprint

    torch.manual_seed(0)
    state = {f"layers.{i}.{n}": 0.02 * torch.randn(64, 192) for i in (0, 1) for n in ("attention.wq.weight", "feed_forward.w2.weight")}
    bf16 = {k: v.to(torch.bfloat16) for k, v in state.items()}
    fp16 = {k: v.to(torch.float16) for k, v in bf16.items()}
    assert any((v.float() != bf16[k].float()).any() for k, v in fp16.items())  # the copies do differ
    assert base_fingerprint(bf16.__getitem__, 2) == base_fingerprint(fp16.__getitem__, 2) == base_fingerprint(state.__getitem__, 2)
    other = {k: v + 0.01 for k, v in state.items()}
    assert base_fingerprint(other.__getitem__, 2) != base_fingerprint(state.__getitem__, 2)


def test_under_autocast_the_lora_branch_computes_in_bf16_while_a_and_b_stay_fp32():
    """What docs/gpu.md says of one-process bf16 training (torch.autocast): the branch's matmuls run in bf16, so its
    output is the bf16 computation's, not the fp32 one's; the trainable matrices themselves stay fp32."""
    torch.manual_seed(0)
    layer = LoRALinear(torch.nn.Parameter(torch.randn(32, 64).bfloat16(), requires_grad=False), r=4, alpha=8)
    with torch.no_grad():
        layer.lora_b.normal_()
    x = torch.randn(3, 64).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    frozen = x @ layer.weight.T
    in_bf16 = frozen + ((x @ layer.lora_a.bfloat16().T) @ layer.lora_b.bfloat16().T * 2).bfloat16()
    in_fp32 = frozen + ((x.float() @ layer.lora_a.T) @ layer.lora_b.T * 2).bfloat16()
    assert torch.equal(y, in_bf16) and not torch.equal(y, in_fp32)
    assert layer.lora_a.dtype == layer.lora_b.dtype == torch.float32
