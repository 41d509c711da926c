"""model.py against independent references: HF transformers' LlamaForCausalLM, Meta's shard layout,
and the model itself without a KV cache."""

import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, stdlib_text
import model as M
from longlora import memory
from longlora.inspect import main
from longlora.tokenizer import Tokenizer
from longlora.weights import CheckpointError, hf_config_fields
from model import FeedForward, KVCache, ModelArgs, RMSNorm, Transformer, preset, rope_angles, rope_frequencies

import transformers  # a test requirement (requirements-test.txt), the independent reference

TOL = 1e-4  # max abs logit difference vs HF in fp32 (observed ~1e-6; different op order)
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 8.0,
          "original_max_position_embeddings": 256}

HF_CASES = {
    # name: (transformers config class, its kwargs, save kwargs)
    "gqa_untied": ("LlamaConfig", dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False), {}),
    "mha_tied": ("LlamaConfig", dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True), {}),
    "linear_rope_scaling_theta": ("LlamaConfig", dict(num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=False,
                                                      rope_theta=50000.0, rope_scaling={"rope_type": "linear", "factor": 4.0}),
                                  {"max_shard_size": "40KB"}),  # a sharded save with an index
    # Llama 3.2's shape: rope type llama3 with rope_theta 500000, GQA, tied embeddings. head_dim 16: 8 pairs with
    # wavelengths 6, 32, 167, 863, ... positions; bounds 256 / 8 = 32 and 256 / 1: one pair kept, two blended, five divided
    "llama3_rope_gqa_tied": ("LlamaConfig", dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                                                 max_position_embeddings=512, rope_theta=500000.0, rope_scaling=LLAMA3), {}),
    "mistral_no_window": ("MistralConfig", dict(num_attention_heads=4, num_key_value_heads=2, sliding_window=None,
                                                rope_theta=1e6), {}),
    "mistral_window_covers_the_context": ("MistralConfig", dict(num_attention_heads=4, num_key_value_heads=2,
                                                                sliding_window=256), {}),  # = max_position_embeddings
    "qwen2_qkv_bias_tied": ("Qwen2Config", dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                                                rope_theta=1e6), {}),
}


def make_hf_model(tmp_path, name, seed=0, **overrides):
    """A random model of HF_CASES[name], built and saved by transformers itself."""
    config_class, cfg_kw, save_kw = HF_CASES[name]
    torch.manual_seed(seed)
    cfg = getattr(transformers, config_class)(**{**dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, vocab_size=300,
                                                        max_position_embeddings=256, rms_norm_eps=1e-5), **cfg_kw, **overrides})
    hf = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # HF's init leaves norms at 1 and weights tiny: make every tensor matter
        for n, p in hf.named_parameters():
            p.copy_(1 + 0.3 * torch.randn_like(p) if "norm" in n else 0.2 * torch.randn_like(p))
    d = tmp_path / name
    hf.save_pretrained(d, **save_kw)
    return hf, d


def hf_logits(hf, tokens):
    with torch.no_grad():
        return hf(tokens).logits


@pytest.mark.parametrize("name", list(HF_CASES))
def test_logits_equal_hf_transformers(tmp_path, name):
    hf, d = make_hf_model(tmp_path, name)
    if "max_shard_size" in HF_CASES[name][1]:
        assert (d / "model.safetensors.index.json").exists(), "the sharded case must really be sharded"
    model = Transformer.from_pretrained(str(d)).eval()
    tokens = torch.randint(0, 300, (2, 80), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(tokens)
    assert ours.shape == (2, 80, 300)
    assert (ours - hf_logits(hf, tokens)).abs().max().item() <= TOL


def test_loss_ignores_minus_100_and_matches_hf(tmp_path):
    hf, d = make_hf_model(tmp_path, "gqa_untied")
    model = Transformer.from_pretrained(str(d)).eval()
    tokens = torch.randint(0, 300, (2, 24))
    targets = torch.roll(tokens, -1, dims=1)
    targets[:, :10] = -100  # e.g. a masked prompt
    with torch.no_grad():
        loss = model(tokens, targets)
        logits = hf(tokens).logits
    ref = torch.nn.functional.cross_entropy(logits[:, 10:].reshape(-1, 300), targets[:, 10:].reshape(-1))
    assert abs(loss.item() - ref.item()) < 1e-5


def test_lean_training_forward_equals_the_plain_loss_and_its_gradients(monkeypatch):
    """The chunked loss (its own reference: logits of the whole sequence, then cross-entropy) in fp32, with
    -100 targets, a whole chunk of them, and B*T not a multiple of the chunk size. The FFN is chunked too and
    the blocks are checkpointed, so the nested checkpoints are covered (model.lean: longlora/memory.py)."""
    torch.manual_seed(0)
    model = Transformer(preset("tiny")).train()
    tokens = torch.randint(0, 256, (2, 19))
    targets = torch.roll(tokens, -1, dims=1)
    targets[0, :5] = -100  # a masked prompt
    targets[1, 3:13] = -100  # flat 22..31: all of the chunk [24, 32) of the 38 tokens
    params = [p for p in model.parameters()]

    def loss_and_grads(loss_fn):
        model.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in params]

    logits = lambda: model(tokens).float().flatten(0, 1)  # noqa: E731  (B*T, V), the plain forward
    plain_mean = loss_and_grads(lambda: torch.nn.functional.cross_entropy(logits(), targets.flatten()))
    plain_sum = loss_and_grads(lambda: torch.nn.functional.cross_entropy(logits(), targets.flatten(), reduction="sum"))
    monkeypatch.setattr(memory, "CHUNK_SIZE", 8)
    monkeypatch.setattr(memory, "FFN_CHUNK_SIZE", 4)
    model.lean = model.gradient_checkpointing = True
    for reduction, (ref, ref_grads) in (("mean", plain_mean), ("sum", plain_sum)):
        loss, grads = loss_and_grads(lambda: model(tokens, targets, reduction=reduction))
        assert loss.dtype == torch.float32 and loss.shape == ()
        torch.testing.assert_close(loss, ref, rtol=0, atol=1e-6)
        for g, r in zip(grads, ref_grads):
            torch.testing.assert_close(g, r, rtol=0, atol=1e-6)


def test_chunked_feed_forward_equals_the_whole_sequence_forward_and_backward(monkeypatch):
    """memory.feed_forward_in_chunks against the plain ffn(norm(x)) of model.py."""
    torch.manual_seed(0)
    ffn, norm = FeedForward(16, 48), RMSNorm(16)
    x = torch.randn(2, 13, 16, requires_grad=True)  # 13 tokens: chunks of 5, 5 and 3
    grad_out = torch.randn(2, 13, 16)
    monkeypatch.setattr(memory, "FFN_CHUNK_SIZE", 5)
    results = []
    for forward in (lambda: ffn(norm(x)), lambda: memory.feed_forward_in_chunks(ffn, norm, x)):
        ffn.zero_grad(set_to_none=True)
        norm.zero_grad(set_to_none=True)
        x.grad = None
        y = forward()
        y.backward(grad_out)
        results.append((y.detach(), x.grad.clone(), [p.grad.clone() for p in [*ffn.parameters(), norm.weight]]))
    (y0, gx0, gw0), (y1, gx1, gw1) = results
    torch.testing.assert_close(y1, y0, rtol=0, atol=1e-6)
    torch.testing.assert_close(gx1, gx0, rtol=0, atol=1e-6)
    for a, b in zip(gw1, gw0):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def plain_rms_norm(x, weight, eps):
    """RMSNorm as plain tensor ops (model.py's formula before RMSNormFunction; HF's LlamaRMSNorm): autograd's
    gradients of it are the reference."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return xf.type_as(x) * weight


# the last: a bf16 x with a trainable fp32 weight (one process under torch.autocast)
@pytest.mark.parametrize("x_dtype,w_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                             (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("trains", ["both", "x only (frozen weight)", "weight only"])
def test_rms_norm_equals_the_plain_formula_and_its_gradients(monkeypatch, x_dtype, w_dtype, trains):
    """Forward bit for bit; gradients as autograd's of the plain formula: fp32 within 1e-6 (the weight's, a sum over
    148 tokens, within 1e-6 of its largest entry), bf16 within one bf16 rounding step (observed: bit-equal). The
    backward runs in pieces of CHUNK_SIZE tokens: 7 here, so 148 tokens are 21 pieces and a last one of a single token."""
    monkeypatch.setattr(memory, "CHUNK_SIZE", 7)
    torch.manual_seed(0)
    x0, w0 = (3 * torch.randn(4, 37, 64)).to(x_dtype), (1 + 0.3 * torch.randn(64)).to(w_dtype)
    grad_out = torch.randn(4, 37, 64).to(torch.promote_types(x_dtype, w_dtype))
    results = []
    for norm in (lambda x, w: plain_rms_norm(x, w, 1e-5), lambda x, w: memory.RMSNormFunction.apply(x, w, 1e-5)):
        x = x0.clone().requires_grad_(trains != "weight only")
        w = w0.clone().requires_grad_(trains != "x only (frozen weight)")
        y = norm(x, w)
        y.backward(grad_out)
        results.append((y, x.grad, w.grad))
    (y_ref, gx_ref, gw_ref), (y, gx, gw) = results
    assert y.dtype == y_ref.dtype and torch.equal(y, y_ref)
    assert (gx is None) == (trains == "weight only") and (gw is None) == (trains == "x only (frozen weight)")
    tol = dict(rtol=0, atol=1e-6) if x_dtype == torch.float32 else dict(rtol=2 ** -8, atol=1e-6)
    if gx is not None:
        assert gx.dtype == x_dtype
        torch.testing.assert_close(gx, gx_ref, **tol)
    if gw is not None:
        assert gw.dtype == w_dtype
        scale = gw_ref.abs().max().item() if w_dtype == torch.float32 else 1.0
        torch.testing.assert_close(gw, gw_ref, **{**tol, "atol": tol["atol"] * scale})


def test_lean_rms_norm_keeps_only_its_input_and_the_rsqrt():
    """What backward keeps (memory.rms_norm): x itself (the same storage, no fp32 copy), one fp32 number per token,
    and the weight."""
    norm = RMSNorm(64).to(torch.bfloat16)
    x = torch.randn(2, 10, 64, dtype=torch.bfloat16, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        memory.rms_norm(x, norm)
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in saved}
    weight = norm.weight.untyped_storage().data_ptr()
    assert x.untyped_storage().data_ptr() in storages and weight in storages
    assert sum(n for p, n in storages.items() if p != weight) == x.numel() * 2 + 2 * 10 * 4


def test_rope_in_pieces_equals_rope_whole(monkeypatch):
    """memory.rope_in_chunks rotates a long sequence CHUNK_SIZE tokens at a time: the same numbers, forward and
    backward, as model.apply_rope."""
    torch.manual_seed(0)
    x = torch.randn(2, 23, 4, 16, dtype=torch.bfloat16, requires_grad=True)
    cos, sin = rope_angles(torch.arange(23), rope_frequencies(preset("tiny")), scaling=2.0)
    grad_out = torch.randn(2, 23, 4, 16, dtype=torch.bfloat16)
    results = []
    for rotate in (M.apply_rope, memory.rope_in_chunks(M.apply_rope)):  # whole; pieces of 5, 5, 5, 5 and 3 tokens
        monkeypatch.setattr(memory, "CHUNK_SIZE", 5)
        x.grad = None
        y = rotate(x, cos, sin)
        y.backward(grad_out)
        results.append((y.detach(), x.grad.clone()))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


def test_a_checkpointed_training_forward_keeps_only_the_block_inputs_and_the_last_output(monkeypatch):
    """With every block checkpointed, what waits for backward outside the checkpoints is each block's input and
    the last block's output h (the loss chunks' input: the final norm runs inside each chunk), besides the targets
    and the positions: no normalised copy of the sequence, no fp32 copy."""
    torch.manual_seed(0)
    model = Transformer(preset("tiny")).to(torch.bfloat16).train()
    model.lean = model.gradient_checkpointing = True
    monkeypatch.setattr(memory, "CHUNK_SIZE", 8)
    tokens = torch.randint(0, 256, (2, 19))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}  # storage -> (dtype, bytes)

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = (t.dtype, t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(tokens, tokens)
    activations = [v for k, v in saved.items() if k not in params and v[0].is_floating_point]
    args = model.args
    assert activations == [(torch.bfloat16, 2 * 19 * args.dim * 2)] * (args.n_layers + 1)


def write_meta_shards(model: Transformer, out, n_shards: int, multiple_of: int = 32):
    """Split a model the way Meta's model-parallel code did, written independently of weights.read_meta."""
    os.makedirs(out, exist_ok=True)
    sd = model.state_dict()
    row_parallel = ("tok_embeddings.weight", "attention.wo.weight", "feed_forward.w2.weight")  # split on input
    shards = [{} for _ in range(n_shards)]
    for k, v in sd.items():
        for i in range(n_shards):
            if v.ndim == 1:
                shards[i][k] = v.clone()
            elif k.endswith(row_parallel):
                shards[i][k] = v.chunk(n_shards, dim=1)[i].clone()
            else:
                shards[i][k] = v.chunk(n_shards, dim=0)[i].clone()
    for i, s in enumerate(shards):
        torch.save(s, os.path.join(out, f"consolidated.{i:02d}.pth"))
    a = model.args
    params = {"dim": a.dim, "n_layers": a.n_layers, "n_heads": a.n_heads, "n_kv_heads": a.n_kv_heads,
              "multiple_of": multiple_of, "norm_eps": a.norm_eps, "vocab_size": -1}  # FFN: 2/3 * 4 * 64 -> 192
    (out / "params.json").write_text(json.dumps(params))


def test_meta_two_shards_load_to_the_same_logits_as_hf(tmp_path):
    hf, d = make_hf_model(tmp_path, "gqa_untied")
    src = Transformer.from_pretrained(str(d))
    write_meta_shards(src, tmp_path / "meta", n_shards=2)
    meta = Transformer.from_pretrained(str(tmp_path / "meta")).eval()
    assert meta.args.vocab_size == 300 and meta.args.hidden_dim == 192
    tokens = torch.randint(0, 300, (1, 33))
    with torch.no_grad():
        assert (meta(tokens) - hf_logits(hf, tokens)).abs().max().item() <= TOL


def test_own_checkpoint_round_trip(tmp_path, sp_model):
    torch.manual_seed(0)
    model = Transformer(preset("tiny", vocab_size=512, rope_scaling=2.0, max_seq_len=256)).eval()
    model.save_pretrained(tmp_path / "ck", tokenizer_path=sp_model)
    back = Transformer.from_pretrained(str(tmp_path / "ck")).eval()
    assert back.args == model.args
    assert isinstance(back.tokenizer, Tokenizer)
    tokens = torch.randint(0, 256, (2, 20))
    with torch.no_grad():
        assert torch.equal(model(tokens), back(tokens))


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])
def test_kv_cache_decoding_equals_full_forward(n_kv_heads):
    torch.manual_seed(0)
    model = Transformer(preset("tiny", n_kv_heads=n_kv_heads, rope_scaling=2.0)).eval()
    tokens = torch.randint(0, 256, (2, 30))
    with torch.no_grad():
        full = model(tokens)
        cache = KVCache(model.args, batch_size=2, max_len=30)
        steps = [model(tokens[:, :7], cache=cache)]  # a prefill chunk, then one token at a time
        steps += [model(tokens[:, t:t + 1], cache=cache) for t in range(7, 30)]
    assert (torch.cat(steps, dim=1) - full).abs().max().item() < 1e-5


def test_presets_match_the_official_shapes():
    ffn = {"llama2-7b": 11008, "llama2-13b": 13824, "llama2-70b": 28672}
    for name, hidden in ffn.items():
        assert preset(name).hidden_dim == hidden
    assert preset("llama2-70b").n_kv_heads == 8
    with torch.device("meta"):
        n = Transformer(preset("llama2-7b")).num_params()
    assert 6.7e9 < n < 6.8e9  # LLaMA2-7B has 6.74B parameters


def test_tokenizer_round_trips_real_text(sp_model):
    tok = Tokenizer(sp_model)
    text = stdlib_text(("json/__init__.py",))  # not in the tokenizer's training text
    text += "\nnon-ASCII falls back to bytes: ∑ ü 你好 🙂, digits split: 1234567\n"
    ids = tok.encode(text, bos=True, eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert tok.decode(ids) == text
    assert all(0 <= i < tok.vocab_size for i in ids)
    digits = tok.encode("1234567", bos=False)
    assert len(digits) >= 7  # split_digits: every digit is its own piece


def test_rope_scaling_divides_positions():
    """Linear interpolation: position p with factor s turns by the same angle as position p / s."""
    inv_freq = rope_frequencies(preset("tiny"))  # head_dim 16, theta 10000
    c1, s1 = rope_angles(torch.arange(0, 64, 4), inv_freq, scaling=4.0)
    c2, s2 = rope_angles(torch.arange(0, 16), inv_freq, scaling=1.0)
    assert torch.allclose(c1, c2) and torch.allclose(s1, s2)


# ---- bad input: one clear line, non-zero exit ------------------------------------------------------


def run_cli(path, capsys):
    capsys.readouterr()  # drop what building the fixture printed (HF's progress bars)
    code = main(["--model", str(path)])
    err = capsys.readouterr().err.strip()
    return code, err


def corrupt(tmp_path, kind):
    hf, d = make_hf_model(tmp_path, "linear_rope_scaling_theta")
    if kind == "missing_hf_shard":
        os.remove(sorted(d.glob("model-*.safetensors"))[0])
    elif kind == "truncated_safetensors":
        f = sorted(d.glob("model-*.safetensors"))[-1]
        data = f.read_bytes()
        f.write_bytes(data[: len(data) // 2])
    elif kind == "wrong_shape":
        from safetensors.torch import load_file, save_file
        f = sorted(d.glob("model-*.safetensors"))[0]
        sd = load_file(f)
        k = sorted(sd)[0]
        sd[k] = torch.zeros(3, 5)
        save_file(sd, f, metadata={"format": "pt"})
    elif kind == "missing_config":
        os.remove(d / "config.json")
    elif kind == "unknown_format":
        shutil.rmtree(d)
        d.mkdir()
        (d / "weights.bin").write_bytes(b"\0" * 10)
    elif kind in ("missing_meta_shard", "missing_params"):
        src = Transformer.from_pretrained(str(d))
        d = tmp_path / "meta"
        write_meta_shards(src, d, n_shards=2)
        os.remove(d / ("consolidated.01.pth" if kind == "missing_meta_shard" else "params.json"))
    elif kind == "missing_dir":
        d = tmp_path / "nowhere"
    elif kind == "index_without_weight_map":
        (d / "model.safetensors.index.json").write_text("{}")
    elif kind == "string_number_in_config":
        cfg = json.loads((d / "config.json").read_text())
        (d / "config.json").write_text(json.dumps({**cfg, "hidden_size": str(cfg["hidden_size"])}))
    elif kind.startswith(("hf_", "meta_", "own_")):  # one tensor dropped from, or added to, every file
        fmt, what = kind.split("_", 1)
        if what == "missing_tensor":
            edit = lambda s, name: s.pop(name)  # noqa: E731
        else:
            edit = lambda s, name: s.update({name + "_x": s[name].clone()})  # noqa: E731
        if fmt == "hf":  # the sharded save: edit the shard that holds the up projection of layer 1
            from safetensors.torch import load_file, save_file
            for f in d.glob("model-*.safetensors"):
                sd = load_file(f)
                if "model.layers.1.mlp.up_proj.weight" in sd:
                    edit(sd, "model.layers.1.mlp.up_proj.weight")
                    save_file(sd, f, metadata={"format": "pt"})
        elif fmt == "meta":
            src = Transformer.from_pretrained(str(d))
            d = tmp_path / "meta"
            write_meta_shards(src, d, n_shards=2)
            for f in d.glob("consolidated.*.pth"):
                sd = torch.load(f, weights_only=True)
                edit(sd, "layers.1.feed_forward.w3.weight")
                torch.save(sd, f)
        else:
            from safetensors.torch import load_file, save_file
            src = Transformer.from_pretrained(str(d))
            d = tmp_path / "own"
            src.save_pretrained(str(d))
            sd = load_file(d / "model.safetensors")
            edit(sd, "layers.1.feed_forward.w3.weight")
            save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
    return d


BAD = {
    "missing_hf_shard": "missing shard",
    "truncated_safetensors": "cannot read safetensors",
    "wrong_shape": "has shape (3, 5)",
    "missing_config": "no config.json",
    "unknown_format": "not a checkpoint directory",
    "missing_meta_shard": "shard is missing",
    "missing_params": "no params.json",
    "missing_dir": "no such file or directory",
    "index_without_weight_map": "model.safetensors.index.json: no weight_map",
    "string_number_in_config": "config.json: ",
    # every loader is strict: one tensor too few or too many stops the load
    "hf_missing_tensor": "missing tensor layers.1.feed_forward.w3.weight",
    "hf_unexpected_tensor": "unexpected tensor model.layers.1.mlp.up_proj.weight_x",
    "meta_missing_tensor": "missing tensor layers.1.feed_forward.w3.weight",
    "meta_unexpected_tensor": "unexpected tensor layers.1.feed_forward.w3.weight_x",
    "own_missing_tensor": "missing tensor layers.1.feed_forward.w3.weight",
    "own_unexpected_tensor": "unexpected tensor layers.1.feed_forward.w3.weight_x",
}


@pytest.mark.parametrize("kind", list(BAD))
def test_bad_checkpoint_gives_one_clear_line(tmp_path, capsys, kind):
    d = corrupt(tmp_path, kind)
    code, err = run_cli(d, capsys)
    assert code != 0
    assert len(err.splitlines()) == 1 and err.startswith("error:"), err
    assert BAD[kind] in err, err
    with pytest.raises(CheckpointError):
        Transformer.from_pretrained(str(d))


def test_cli_runs_a_preset_and_fails_cleanly_as_a_process(tmp_path):
    ok = subprocess.run([sys.executable, "-m", "longlora.inspect", "--preset", "tiny"], cwd=ROOT, capture_output=True, text=True)
    assert ok.returncode == 0 and "logits (1, 8, 256)" in ok.stdout, ok.stderr
    bad = subprocess.run([sys.executable, "-m", "longlora.inspect", "--model", str(tmp_path)], cwd=ROOT, capture_output=True,
                         text=True)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and bad.stderr.count("\n") == 1, bad.stderr


# ---- the context under linear RoPE scaling: two conventions, one field tells them apart ----------------


def hf_config_to_args(cfg):
    return ModelArgs(**hf_config_fields(cfg))


def saved_config(tmp_path, name, config_class=transformers.LlamaConfig, **kw):
    """config.json as transformers itself writes it, read back by longlora/weights.py."""
    cfg = config_class(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4, **kw)
    cfg.save_pretrained(tmp_path / name)
    return hf_config_to_args(json.load(open(tmp_path / name / "config.json")))


def test_longlora_released_models_read_as_their_extended_context(tmp_path):
    # fine-tune.py keeps max_position_embeddings (LLaMA2's 4096) and adds the factor: its 32k -ft models say 4096 + 8
    args = saved_config(tmp_path, "longlora", max_position_embeddings=4096, rope_scaling={"type": "linear", "factor": 8.0})
    assert (args.max_seq_len, args.rope_scaling, args.original_max_seq_len) == (32768, 8.0, 4096)
    # the same config as transformers 4.x wrote it (the released files): rope_scaling, no rope_parameters
    legacy = json.load(open(tmp_path / "longlora" / "config.json"))
    legacy.pop("rope_parameters")
    legacy["rope_scaling"] = {"type": "linear", "factor": 8.0}
    assert hf_config_to_args(legacy).max_seq_len == 32768
    # extending it to 64k: LongLoRA's fine-tune.py computes ceil(65536 / max_position_embeddings) = ceil(65536 / 4096)
    args.extend_context(65536)
    assert (args.rope_scaling, args.max_seq_len, args.original_max_seq_len) == (16.0, 65536, 4096)
    args.extend_context(100000)  # LongLoRA's 100k model: ceil(100000 / 4096) = 25
    assert args.rope_scaling == 25.0


def test_earlier_exports_read_the_context_from_max_position_embeddings(tmp_path):
    # this project's earlier exports: max_position_embeddings = the context, original_max_position_embeddings = pre-training
    args = saved_config(tmp_path, "ours", max_position_embeddings=30000, original_max_position_embeddings=4096,
                        rope_scaling={"type": "linear", "factor": 8.0})
    assert (args.max_seq_len, args.rope_scaling, args.original_max_seq_len) == (30000, 8.0, 4096)
    # no scaling: one context, whatever the convention
    args = saved_config(tmp_path, "plain", max_position_embeddings=4096)
    assert (args.max_seq_len, args.rope_scaling, args.original_max_seq_len) == (4096, 1.0, 4096)


def test_a_raised_max_position_embeddings_with_a_factor_reads_by_our_rule_with_a_warning(tmp_path, capsys):
    """Without original_max_position_embeddings the context is max_position_embeddings x factor, our rule for
    LongLoRA's configs; a model that raised max_position_embeddings itself (togethercomputer/LLaMA-2-7B-32K) reads
    as 262,144 tokens, and loading says so and names the field that settles it."""
    capsys.readouterr()
    assert saved_config(tmp_path, "longlora", max_position_embeddings=4096,
                        rope_scaling={"type": "linear", "factor": 8.0}).max_seq_len == 32768
    assert capsys.readouterr().err == ""  # LLaMA2's 4096: LongLoRA's convention, no doubt
    assert saved_config(tmp_path, "raised", max_position_embeddings=32768,
                        rope_scaling={"type": "linear", "factor": 8.0}).max_seq_len == 262144
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("warning:") and "262144" in err and "original_max_position_embeddings" in err
    args = saved_config(tmp_path, "settled", max_position_embeddings=32768, original_max_position_embeddings=4096,
                        rope_scaling={"type": "linear", "factor": 8.0})
    assert (args.max_seq_len, args.original_max_seq_len) == (32768, 4096) and capsys.readouterr().err == ""


@pytest.mark.parametrize("ctx", [32768, 30000, 100000])
def test_an_extended_models_config_follows_hfs_linear_convention_in_transformers_and_here(tmp_path, ctx, caplog):
    """max_position_embeddings stays the pre-training context and x factor gives the context the interpolation
    reaches (what vLLM and SGLang derive): the trained context rounded up to a multiple of 4096, as the factor is
    ceil(ctx / 4096). No original_max_position_embeddings, one dtype field."""
    from longlora.weights import hf_config

    args = preset("llama2-7b")
    args.extend_context(ctx)  # 100000: factor 25, which reaches 102400
    cfg = hf_config(args, torch.bfloat16)
    assert cfg["max_position_embeddings"] == 4096 and "original_max_position_embeddings" not in cfg
    assert cfg["max_position_embeddings"] * cfg["rope_scaling"]["factor"] == 4096 * math.ceil(ctx / 4096) >= ctx
    back = hf_config_to_args(cfg)
    assert (back.max_seq_len, back.rope_scaling, back.original_max_seq_len) == (4096 * math.ceil(ctx / 4096), args.rope_scaling, 4096)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with caplog.at_level("WARNING"):
        hf = transformers.AutoConfig.from_pretrained(str(tmp_path))
    assert not [r for r in caplog.records if "rope" in r.getMessage().lower()], caplog.text
    # one field per fact: rope_scaling alone, which transformers 5.x converts to its rope_parameters; one dtype field
    assert "rope_parameters" not in cfg and hf.rope_parameters["factor"] == args.rope_scaling
    assert hf.rope_parameters["rope_theta"] == args.rope_theta and hf.max_position_embeddings == 4096
    assert [k for k in cfg if "dtype" in k] == ["torch_dtype"] and hf.dtype == torch.bfloat16


# ---- LLaMA 3, Mistral, Qwen2: what is read, what is refused ------------------------------------------


def test_llama3_frequencies_equal_transformers_and_linear_interpolation_divides_them(tmp_path):
    """The llama3 rule against transformers' own computation, and our composition: --ctx beyond the model's context
    (max_position_embeddings, 512: the llama3 rule already stretched 256 to it) divides every llama3 frequency by
    ceil(ctx / 512)."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                                   max_position_embeddings=512, rope_theta=500000.0, rope_scaling=dict(LLAMA3))
    reference, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    args = hf_config_to_args(cfg.to_dict())
    assert (args.max_seq_len, args.original_max_seq_len, args.rope_scaling, args.llama3_context) == (512, 512, 1.0, 256)
    torch.testing.assert_close(rope_frequencies(args), reference, rtol=1e-6, atol=0)
    args.extend_context(1500)
    assert (args.rope_scaling, args.max_seq_len, args.llama3_factor) == (3.0, 1500, 8.0)
    positions = torch.arange(1500)
    cos, sin = rope_angles(positions, rope_frequencies(args), args.rope_scaling)
    angles = torch.outer(positions.double(), reference.double() / 3)
    torch.testing.assert_close(cos.double(), angles.cos(), rtol=0, atol=1e-4)
    torch.testing.assert_close(sin.double(), angles.sin(), rtol=0, atol=1e-4)


def test_llama3_with_linear_interpolation_is_refused_for_hf_and_meta_and_kept_by_the_own_layout(tmp_path):
    """transformers applies one rope type: llama3 followed by a division of every frequency has no config.json form
    (a llama3 factor multiplied instead would keep the fast pairs that the interpolation slows)."""
    from longlora.weights import hf_config

    hf, d = make_hf_model(tmp_path, "llama3_rope_gqa_tied")
    model = Transformer.from_pretrained(str(d)).eval()
    hf_config(model.args, torch.float32)  # within its context: exported as it was read
    model.args.extend_context(1024)
    for fmt in ("hf", "meta"):
        with pytest.raises(ValueError, match="--format own" if fmt == "hf" else "--format hf or own"):
            M.write_model(model.args, model.state_dict(), str(tmp_path / fmt), fmt)
    assert not (tmp_path / "hf").exists()
    model.save_pretrained(str(tmp_path / "own"))
    back = Transformer.from_pretrained(str(tmp_path / "own")).eval()
    assert back.args == model.args
    tokens = torch.randint(0, 300, (1, 50))
    with torch.no_grad():
        assert torch.equal(back(tokens), model(tokens))


def edit_config(d, **fields):
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, **fields}))
    return d


REFUSED = {  # config.json fields -> what the one error line names
    "gemma": (dict(model_type="gemma", architectures=["GemmaForCausalLM"]), "architecture 'GemmaForCausalLM'"),
    "phi3_model_type": (dict(model_type="phi3", architectures=None), "model_type 'phi3'"),
    "gpt2_architecture": (dict(architectures=["GPT2LMHeadModel"]), "architecture 'GPT2LMHeadModel'"),
    "attention_bias": (dict(attention_bias=True), "attention_bias true"),
    "mlp_bias": (dict(mlp_bias=True), "mlp_bias true"),
    "head_dim": (dict(head_dim=32), "head_dim 32"),
    "yarn": (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 500000.0}), "'yarn'"),
    "dynamic": (dict(rope_parameters={"rope_type": "dynamic", "factor": 4.0, "rope_theta": 500000.0}), "'dynamic'"),
    "longrope": (dict(rope_parameters={"rope_type": "longrope", "factor": 4.0, "rope_theta": 500000.0}), "'longrope'"),
    "partial_rotary_factor": (dict(partial_rotary_factor=0.5), "partial_rotary_factor"),
    "llama3_two_original_contexts": (dict(original_max_position_embeddings=128), "original_max_position_embeddings 128"),
    "mistral_window": (dict(model_type="mistral", architectures=["MistralForCausalLM"], sliding_window=64),
                       "sliding_window 64 is shorter than the context 512"),
    "qwen2_window": (dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], use_sliding_window=True, sliding_window=64),
                     "sliding_window 64"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_a_model_or_feature_that_would_compute_something_else_is_refused_in_one_line_naming_it(tmp_path, capsys, case):
    fields, named = REFUSED[case]
    _, d = make_hf_model(tmp_path, "llama3_rope_gqa_tied")
    code, err = run_cli(edit_config(d, **fields), capsys)
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error:") and named in err, err


def test_metas_use_scaled_rope_is_refused_in_one_line(tmp_path, capsys):
    write_meta_shards(Transformer(preset("tiny")), tmp_path / "meta", n_shards=1)
    params = json.loads((tmp_path / "meta" / "params.json").read_text())
    (tmp_path / "meta" / "params.json").write_text(json.dumps({**params, "use_scaled_rope": True}))
    code, err = run_cli(tmp_path / "meta", capsys)
    assert code == 2 and len(err.splitlines()) == 1 and "use_scaled_rope" in err, err


def test_a_qwen2_window_that_is_off_is_ignored_as_transformers_ignores_it(tmp_path):
    saved_config(tmp_path, "qwen2", config_class=transformers.Qwen2Config, num_key_value_heads=2, max_position_embeddings=512,
                 use_sliding_window=False)
    cfg = json.loads((tmp_path / "qwen2" / "config.json").read_text())
    args = hf_config_to_args({**cfg, "sliding_window": 64})  # set, but off: Qwen2Config nulls it
    assert args.qkv_bias and args.max_seq_len == 512


# ---- each family end to end: train.py (s2, sf), lora.py merge, sample.py and eval against transformers ----------


E2E = {  # family -> (HF case, max_position_embeddings): mistral and qwen2 train at --ctx 128, twice their context
    "llama3": ("llama3_rope_gqa_tied", 512),  # within its context: the llama3 rule alone, exported as read
    "mistral": ("mistral_no_window", 64),
    "qwen2": ("qwen2_qkv_bias_tied", 64),
}


@pytest.mark.parametrize("family", list(E2E))
def test_each_family_trains_and_its_merged_export_computes_in_transformers_what_sample_and_eval_compute(
        tmp_path, sp_model, family, request):
    import numpy as np
    import sample
    import train
    from longlora import eval as ev
    from longlora import export
    from longlora.adapter import load_model

    case, max_pos = E2E[family]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model on a busy 2-core machine: a second thread only spins
    request.addfinalizer(lambda: torch.set_num_threads(threads))
    _, d = make_hf_model(tmp_path, case, vocab_size=512, max_position_embeddings=max_pos)  # 512: the test tokenizer's
    shutil.copy(sp_model, d / "tokenizer.model")
    (tmp_path / "corpus.txt").write_text(stdlib_text(("argparse.py",)))
    runs = {}
    for attn in ("s2", "sf"):
        runs[attn] = str(tmp_path / f"run-{attn}")
        assert train.main(["--model", str(d), "--data", str(tmp_path / "corpus.txt"), "--ctx", "128", "--steps", "1",
                           "--attn", attn, "--eval-samples", "2", "--token-cache", str(tmp_path / "tok"),
                           "--out", runs[attn]]) == 0
    merged = str(tmp_path / "merged")
    assert export.main(["merge", "--base", str(d), "--adapter", runs["s2"], "--out", merged]) == 0
    cfg = json.loads(open(os.path.join(merged, "config.json")).read())
    ours = load_model(str(d), runs["s2"])
    assert ours.args.max_seq_len == 128 and ours.args.rope_scaling == (128 / max_pos if max_pos < 128 else 1.0)
    hf = transformers.AutoModelForCausalLM.from_pretrained(merged).eval()
    assert cfg["model_type"] == ("qwen2" if family == "qwen2" else "llama") and hf.config.max_position_embeddings == max_pos
    tokens = torch.randint(3, 512, (2, 128), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (ours(tokens) - hf(tokens).logits).abs().max().item() <= TOL

    # sample.py's greedy tokens are transformers' generate's
    prompt = ours.tokenizer.encode("def parse_args(self, args=None):", bos=True)
    hf.generation_config.eos_token_id = None
    expected = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)[0, len(prompt):].tolist()
    assert list(sample.generate(load_model(merged), prompt, 12, temperature=0.0)) == expected

    # eval's perplexity (non-overlapping windows of 64) is transformers' mean cross-entropy over those windows
    ids = torch.randint(3, 512, (4 * 64,), generator=torch.Generator().manual_seed(3))
    np.asarray(ids, dtype="<u2").tofile(tmp_path / "test.bin")
    assert ev.main(["ppl", "--model", merged, "--tokens", str(tmp_path / "test.bin"), "--seq-lens", "64", "--stride", "0",
                    "--out", str(tmp_path / "ppl.json")]) == 0
    windows = ids.view(4, 64)
    with torch.no_grad():
        logits = hf(windows).logits[:, :-1]
    reference = torch.nn.functional.cross_entropy(logits.reshape(-1, 512), windows[:, 1:].reshape(-1)).item()
    assert abs(json.loads((tmp_path / "ppl.json").read_text())["results"][0]["loss"] - reference) <= 1e-4
