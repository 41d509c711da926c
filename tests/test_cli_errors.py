"""Bad input never crashes and nothing is lost: a table of user mistakes, every CLI. Each case must exit 2 with
exactly one `error:` line on stderr, no traceback, and leave every file that existed before byte-identical.

The cases run in this process (main(argv), as `python X.py` does via cli.entry); two of them also as real
subprocesses. "Read-only" outputs: the tests run as root, whom permission bits do not stop, so an unwritable
path here is one below a regular file (`FILE/out`), which no user can create; output.check_output finds both
kinds the same way, by creating a probe file in the nearest existing folder.
"""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, STDLIB
from safetensors.torch import load_file, save_file

from longlora.adapter import save_adapter
from lora import apply_lora, mark_trainable
from model import Transformer, preset


@pytest.fixture(scope="module")
def world(tmp_path_factory, sp_model):
    """Everything the cases point at: a tiny model, an adapter, a finished training run, and broken copies."""
    torch.set_num_threads(1)
    d = tmp_path_factory.mktemp("world")
    w = {"tok": sp_model}

    def path(name):
        w[name] = str(d / name)
        return w[name]

    torch.manual_seed(0)
    model = Transformer(preset("tiny", vocab_size=512))
    model.save_pretrained(path("base"), tokenizer_path=sp_model)
    apply_lora(model, r=2, alpha=4)
    mark_trainable(model)
    with torch.no_grad():  # as if trained: B != 0, so merging changes the weights
        for name, p in model.named_parameters():
            if name.endswith("lora_b"):
                p.normal_(0, 0.1)
    save_adapter(model, path("adapter"), ctx=128)
    torch.manual_seed(1)  # another base of the same shapes
    Transformer(preset("tiny", vocab_size=512)).save_pretrained(path("other_base"), tokenizer_path=sp_model)
    Transformer(preset("tiny", vocab_size=2048)).save_pretrained(path("big_vocab"), tokenizer_path=sp_model)
    os.makedirs(path("corpus"))
    shutil.copy(os.path.join(STDLIB, "argparse.py"), w["corpus"])
    open(path("file"), "w").write("a regular file\n")
    w["under"] = os.path.join(w["file"], "out")  # below a regular file: unwritable for anyone
    open(path("garbage.model"), "wb").write(b"not a sentencepiece model\n" * 10)

    shutil.copytree(w["base"], path("garbage_tok"))  # a model whose tokenizer.model is garbage
    shutil.copy(w["garbage.model"], os.path.join(w["garbage_tok"], "tokenizer.model"))
    os.makedirs(path("hf_no_hidden"))  # config.json without hidden_size
    json.dump({"model_type": "llama", "num_attention_heads": 4, "num_hidden_layers": 2, "vocab_size": 512,
               "intermediate_size": 192}, open(os.path.join(w["hf_no_hidden"], "config.json"), "w"))
    shutil.copytree(w["base"], path("dim_str"))  # params.json with "dim": "64"
    params = json.load(open(os.path.join(w["base"], "params.json")))
    json.dump({**params, "dim": "64"}, open(os.path.join(w["dim_str"], "params.json"), "w"))
    os.makedirs(path("meta_bad"))  # a Meta params.json of another size than its weights
    torch.save(Transformer(preset("tiny", vocab_size=512)).state_dict(), os.path.join(w["meta_bad"], "consolidated.00.pth"))
    json.dump({"dim": 128, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 512, "multiple_of": 32},
              open(os.path.join(w["meta_bad"], "params.json"), "w"))
    hf = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2, "vocab_size": 512,
          "intermediate_size": 192}
    for name, cfg in (("hf_rope_string", {**hf, "rope_scaling": "linear"}), ("hf_rope_list", {**hf, "rope_scaling": [8.0]}),
                      ("hf_list", [1]), ("hf_heads_0", {**hf, "num_attention_heads": 0}),
                      ("hf_eps_string", {**hf, "rms_norm_eps": "1e-5"}), ("hf_layers_float", {**hf, "num_hidden_layers": 2.5}),
                      ("hf_factor_inf", {**hf, "rope_scaling": {"type": "linear", "factor": float("inf")}}),
                      ("hf_tie_string", {**hf, "tie_word_embeddings": "false"}),
                      ("hf_rope_disagree", {**hf, "rope_scaling": {"type": "linear", "factor": 8.0},
                                            "rope_parameters": {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}}),
                      ("hf_theta_disagree", {**hf, "rope_theta": 50000.0, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}})):
        os.makedirs(path(name))
        json.dump(cfg, open(os.path.join(w[name], "config.json"), "w"))
    os.makedirs(path("meta_heads_float"))  # Meta's layout, a params.json field of the wrong type
    shutil.copy(os.path.join(w["meta_bad"], "consolidated.00.pth"), w["meta_heads_float"])
    json.dump({"dim": 64, "n_layers": 2, "n_heads": 4.5, "n_kv_heads": 2, "vocab_size": 512, "multiple_of": 32},
              open(os.path.join(w["meta_heads_float"], "params.json"), "w"))
    shutil.copytree(w["base"], path("own_list"))
    json.dump([1], open(os.path.join(w["own_list"], "params.json"), "w"))
    shutil.copytree(w["base"], path("own_eps_0"))
    json.dump({**params, "norm_eps": 0}, open(os.path.join(w["own_eps_0"], "params.json"), "w"))
    shutil.copytree(w["base"], path("int8"))  # a quantized checkpoint: integer weights
    tensors = load_file(os.path.join(w["int8"], "model.safetensors"))
    tensors["layers.0.attention.wq.weight"] = (tensors["layers.0.attention.wq.weight"] * 100).to(torch.int8)
    save_file(tensors, os.path.join(w["int8"], "model.safetensors"))
    peft_dir = path("peft_no_fields")  # a PEFT adapter whose config.json lacks fields
    os.makedirs(peft_dir)
    json.dump({"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}, open(os.path.join(peft_dir, "adapter_config.json"), "w"))
    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(2, 64)}, os.path.join(peft_dir, "adapter_model.safetensors"))
    json.dump({"model_type": "llama", "rope_scaling": {"type": "linear", "factor": 2.0}}, open(os.path.join(peft_dir, "config.json"), "w"))
    from longlora import export
    assert export.main(["merge", "--base", w["base"], "--adapter", w["adapter"], "--out", path("merged"), "--format", "own"]) == 0
    assert export.main(["peft", "--base", w["base"], "--adapter", w["adapter"], "--out", path("peft")]) == 0
    peft_cfg = json.load(open(os.path.join(w["peft"], "adapter_config.json")))
    peft_tensors = load_file(os.path.join(w["peft"], "adapter_model.safetensors"))
    a_name = next(k for k in peft_tensors if k.endswith("lora_A.weight"))
    for name, cfg_edit, tensor_edit in (
            ("peft_lora_bias", {"lora_bias": True}, {}), ("peft_alpha_inf", {"lora_alpha": float("inf")}, {}),
            ("peft_r_float", {"r": 8.5}, {}), ("peft_dropout_string", {"lora_dropout": "0.1"}, {}),
            ("peft_layer_replication", {"layer_replication": [[0, 2]]}, {}),
            ("peft_bias_tensor", {}, {a_name.replace("lora_A.weight", "lora_B.bias"): torch.zeros(64)}),
            ("peft_nan_tensor", {}, {a_name: peft_tensors[a_name].index_fill(0, torch.tensor([0]), float("nan"))}),  # one row
            ("peft_int8_tensor", {}, {a_name: peft_tensors[a_name].to(torch.int8)})):
        shutil.copytree(w["peft"], path(name))
        json.dump({**peft_cfg, **cfg_edit}, open(os.path.join(w[name], "adapter_config.json"), "w"))
        save_file({**peft_tensors, **tensor_edit}, os.path.join(w[name], "adapter_model.safetensors"))
    ours_cfg = json.load(open(os.path.join(w["adapter"], "adapter_config.json")))
    ours_tensors = load_file(os.path.join(w["adapter"], "adapter.safetensors"))
    for name, cfg_edit, tensor_edit in (
            ("adapter_dropout_1", {"dropout": 1}, {}), ("adapter_targets_bogus", {"targets": ["wq", "bogus"]}, {}),
            ("adapter_r_string", {"r": "2"}, {}), ("adapter_scaling_nan", {"rope_scaling": float("nan")}, {}),
            ("adapter_inf_tensor", {}, {"norm.weight": ours_tensors["norm.weight"].index_fill(0, torch.tensor([3]), float("inf"))})):
        shutil.copytree(w["adapter"], path(name))
        json.dump({**ours_cfg, **cfg_edit}, open(os.path.join(w[name], "adapter_config.json"), "w"))
        save_file({**ours_tensors, **tensor_edit}, os.path.join(w[name], "adapter.safetensors"))
    good = {"instruction": "Name a module.", "output": "argparse"}
    for name, recs in (("sft_input_number.jsonl", [good, {**good, "input": 5}]), ("sft_input_list.json", [good, {**good, "input": ["x"]}]),
                       ("sft_no_output.jsonl", [good, good, {"instruction": "Name one."}]), ("sft_not_object.json", [good, "text"])):
        with open(path(name), "w") as f:
            f.write("\n".join(json.dumps(r) for r in recs) if name.endswith("l") else json.dumps(recs))
    os.symlink(w["base"], path("link_to_base"))
    shutil.copytree(w["base"], path("mixed"))  # a leftover Meta shard beside this project's layout
    shutil.copy(os.path.join(w["meta_bad"], "consolidated.00.pth"), w["mixed"])

    import train
    assert train.main(train_args(w, path("run"), "--steps", "1", "--save-every", "1", "--keep", "1")) == 0
    ckpt = "checkpoints/step-000001"
    for name, damage in (("trainable.safetensors", "cut"), ("optimizer.pt", "cut"), ("rng.pt", "cut"), ("state.json", "junk")):
        run = path(f"run_bad_{name.split('.')[0]}")
        shutil.copytree(w["run"], run)
        f = os.path.join(run, ckpt, name)
        data = open(f, "rb").read()
        open(f, "wb").write(data[: len(data) // 2] if damage == "cut" else b"{not json")
    return w


def train_args(w, out, *extra):
    return ["--model", w["base"], "--data", w["corpus"], "--ctx", "32", "--grad-accum", "1", "--heldout", "0",
            "--token-cache", os.path.join(os.path.dirname(w["base"]), "tokens"), "--out", out, *extra]


def resume(bad):
    return lambda w: train_args(w, w[bad], "--steps", "2", "--resume", w[bad])


# (id, script, argv: list with {placeholders} or a function of the world, regex the error line must match)
CASES = [
    # model.py
    ("model-garbage-tokenizer", "longlora.inspect", ["--model", "{garbage_tok}"], r"tokenizer\.model: not a sentencepiece"),
    ("model-config-no-hidden-size", "longlora.inspect", ["--model", "{hf_no_hidden}"], r"config\.json: no field 'hidden_size'"),
    ("model-params-dim-string", "longlora.inspect", ["--model", "{dim_str}"], r"params\.json: dim must be a number, got '64'"),
    ("model-meta-params-wrong-size", "longlora.inspect", ["--model", "{meta_bad}"], r"params\.json says dim 128, the weights have 64"),
    ("model-mixed-layouts", "longlora.inspect", ["--model", "{mixed}"], r"two checkpoint layouts \(meta and own\)"),
    ("model-tokenizer-too-small", "longlora.inspect", ["--model", "{big_vocab}"],  # another model's tokenizer
     r"a 512-token tokenizer does not fit the model's 2048-token embedding"),
    ("model-unknown-flag", "longlora.inspect", ["--bogus"], r"unrecognized arguments: --bogus"),
    # sample.py
    ("sample-temperature-nan", "sample", ["--model", "{base}", "--prompt", "hi there", "--temperature", "nan"], r"--temperature must be a finite number >= 0, got nan"),
    ("sample-h2o-no-budget", "sample", ["--model", "{base}", "--prompt", "hi there", "--kv-cache", "h2o", "--heavy", "0",
                                        "--recent", "0"], r"--kv-cache h2o needs --recent > 0"),
    ("sample-sink-no-recent", "sample", ["--model", "{base}", "--prompt", "hi there", "--kv-cache", "sink", "--recent", "0"],
     r"--kv-cache sink needs --recent > 0"),
    ("sample-garbage-tokenizer", "sample", ["--model", "{garbage_tok}", "--prompt", "hi there"], r"not a sentencepiece"),
    ("sample-adapter-on-another-base", "sample", ["--model", "{other_base}", "--adapter", "{adapter}", "--prompt", "hi there"],
     r"trained on another base model"),  # an adapter on the wrong base
    ("sample-adapter-on-its-merged-model", "sample", ["--model", "{merged}", "--adapter", "{adapter}", "--prompt", "hi there"],
     r"already contains it"),
    ("eval-adapter-on-its-merged-model", "longlora.eval", ["ppl", "--model", "{merged}", "--adapter", "{adapter}", "--data", "{corpus}"],
     r"already contains it"),
    # eval.py: --out is checked before the compute (a missing folder would lose every result)
    ("eval-out-below-file", "longlora.eval", ["ppl", "--model", "{base}", "--data", "{corpus}", "--seq-lens", "32",
                                      "--out", "{file}/results.json"], r"--out .*is a file, not a directory"),
    ("eval-out-in-missing-dir", "longlora.eval", ["ppl", "--model", "{base}", "--data", "{corpus}", "--seq-lens", "32",
                                         "--out", "{file}dir6/nope/results.json"], r"--out .*no such folder"),
    ("eval-png-unwritable", "longlora.eval", ["passkey", "--model", "{base}", "--png", "{under}/p.png"], r"--png .*is a file"),
    ("eval-garbage-tokenizer", "longlora.eval", ["ppl", "--model", "{garbage_tok}", "--data", "{corpus}"], r"not a sentencepiece"),
    ("eval-no-task", "longlora.eval", [], r"required: task"),
    # lora.py / export.py
    ("merge-out-is-file", "longlora.export", ["merge", "--base", "{base}", "--adapter", "{adapter}", "--out", "{file}"],
     r"--out .*is a file; expected a directory"),
    ("merge-out-unwritable", "longlora.export", ["merge", "--base", "{base}", "--adapter", "{adapter}", "--out", "{under}"],
     r"--out .*is a file, not a directory"),
    ("peft-out-is-file", "longlora.export", ["peft", "--base", "{base}", "--adapter", "{adapter}", "--out", "{file}"], r"--out .*is a file"),
    ("merge-out-is-base", "longlora.export", ["merge", "--base", "{base}", "--adapter", "{adapter}", "--out", "{base}/."],
     r"--out .* is --base"),
    ("merge-garbage-tokenizer", "longlora.export", ["merge", "--base", "{garbage_tok}", "--adapter", "{adapter}", "--out", "{file}dir4"],
     r"not a sentencepiece"),
    # outputs against inputs by real path; never into a folder this project did not write
    ("merge-out-symlink-to-base", "longlora.export", ["merge", "--base", "{base}", "--adapter", "{adapter}", "--out", "{link_to_base}"],
     r"--out .*link_to_base is --base"),
    ("merge-out-holds-a-model", "longlora.export", ["merge", "--base", "{base}", "--adapter", "{adapter}", "--out", "{merged}",
                                                  "--format", "hf"], r"merged already exists; choose a new folder, or add --overwrite"),
    ("merge-out-foreign-folder", "longlora.export", ["merge", "--base", "{base}", "--adapter", "{adapter}", "--out", "{corpus}"],
     r"holds files this project did not write"),
    ("train-out-inside-data", "train", lambda w: train_args(w, os.path.join(w["corpus"], "run")), r"--out .* is inside --data"),
    ("train-steps-0", "train", lambda w: train_args(w, os.path.join(os.path.dirname(w["base"]), "s0"), "--steps", "0"),
     r"--steps must be an integer >= 1, got 0"),
    ("eval-out-inside-data", "longlora.eval", ["ppl", "--model", "{base}", "--data", "{corpus}", "--out", "{corpus}/ppl.json"],
     r"--out .* is inside --data"),
    # train.py
    ("train-out-is-file", "train", lambda w: train_args(w, w["file"]), r"--out .*is a file; expected a directory"),
    ("train-out-unwritable", "train", lambda w: train_args(w, w["under"]), r"--out .*is a file, not a directory"),
    ("train-token-cache-is-file", "train", lambda w: train_args(w, w["file"] + "dir")[:-4] + [
        "--token-cache", w["file"], "--out", w["file"] + "dir"], r"--token-cache .*is a file; expected a directory"),
    ("train-garbage-tokenizer", "train", lambda w: train_args(w, os.path.join(w["file"] + "dir", "o"))
     + ["--tokenizer", w["garbage.model"]], r"garbage\.model: not a sentencepiece"),
    ("train-lr-inf", "train", lambda w: train_args(w, w["file"] + "dir2") + ["--lr", "inf"], r"--lr must be"),
    ("train-resume-truncated-trainable", "train", resume("run_bad_trainable"), r"trainable\.safetensors: cannot read"),
    ("train-resume-truncated-optimizer", "train", resume("run_bad_optimizer"), r"optimizer\.pt: cannot read"),
    ("train-resume-truncated-rng", "train", resume("run_bad_rng"), r"rng\.pt: cannot read"),
    ("train-resume-invalid-state-json", "train", resume("run_bad_state"), r"--resume .*state\.json"),
    # config.json, params.json: every field of the right type and range, else one line naming the file and the field
    *[(f"model-{name}", "longlora.inspect", ["--model", "{%s}" % name], pattern) for name, pattern in [
        ("hf_rope_string", r"hf_rope_string/config\.json: field 'rope_scaling' must be an object, got \"linear\""),
        ("hf_rope_list", r"config\.json: field 'rope_scaling' must be an object, got \[8\.0\]"),
        ("hf_list", r"hf_list/config\.json: expected a JSON object, got \[1\]"),
        ("hf_heads_0", r"config\.json: field 'num_attention_heads' must be an integer >= 1, got 0"),
        ("hf_eps_string", r"config\.json: field 'rms_norm_eps' must be a finite number > 0, got \"1e-5\""),
        ("hf_layers_float", r"config\.json: field 'num_hidden_layers' must be an integer >= 1, got 2\.5"),
        ("hf_factor_inf", r"config\.json: rope_scaling: field 'factor' must be a finite number >= 1, got Infinity"),
        ("hf_tie_string", r"config\.json: field 'tie_word_embeddings' must be true or false"),
        ("hf_rope_disagree", r"config\.json: rope_scaling's linear factor 8 and rope_parameters's linear factor 4 disagree"),
        ("hf_theta_disagree", r"config\.json: rope_parameters's rope_theta 10000 and rope_theta 50000 disagree"),
        ("meta_heads_float", r"meta_heads_float/params\.json: field 'n_heads' must be an integer >= 1, got 4\.5"),
        ("own_list", r"own_list/params\.json: expected a JSON object"),
        ("own_eps_0", r"own_eps_0/params\.json: norm_eps must be a finite number > 0, got 0"),
        ("int8", r"int8: tensor layers\.0\.attention\.wq\.weight is int8, not floating point")]],
    ("sample-int8-weights", "sample", ["--model", "{int8}", "--prompt", "hi there"], r"wq\.weight is int8, not floating point"),
    ("train-int8-weights", "train", lambda w: train_args(w, w["file"] + "dir7") + ["--model", w["int8"]], r"wq\.weight is int8"),
    ("import-config-lacks-fields", "longlora.export", ["import", "--peft", "{peft_no_fields}", "--base", "{base}", "--out", "{file}dir8"],
     r"peft_no_fields/config\.json: no field 'hidden_size'"),
    # adapter configs and tensors, PEFT's (lora.py import) and ours: every field of its type and range, no bias, finite floats
    *[(f"import-{name}", "longlora.export", ["import", "--peft", "{%s}" % name, "--base", "{base}", "--ctx", "128",
                                             "--out", "{file}dir8"], pattern) for name, pattern in [
        ("peft_lora_bias", r"peft_lora_bias/adapter_config\.json: lora_bias=True is not supported"),
        ("peft_alpha_inf", r"adapter_config\.json: field 'lora_alpha' must be a finite number > 0, got Infinity"),
        ("peft_r_float", r"adapter_config\.json: field 'r' must be an integer >= 1, got 8\.5"),
        ("peft_dropout_string", r"adapter_config\.json: field 'lora_dropout' must be a finite number >= 0 and < 1, got \"0\.1\""),
        ("peft_layer_replication", r"adapter_config\.json: layer_replication=\[\[0, 2\]\] is not supported"),
        ("peft_bias_tensor", r"adapter_model\.safetensors: tensor .*lora_B\.bias is not supported \(a LoRA bias"),
        ("peft_nan_tensor", r"adapter_model\.safetensors: tensor .*lora_A\.weight holds NaN or infinite values"),
        ("peft_int8_tensor", r"adapter_model\.safetensors: tensor .*lora_A\.weight is int8, not floating point")]],
    *[(f"sample-{name}", "sample", ["--model", "{base}", "--adapter", "{%s}" % name, "--prompt", "hi there"], pattern)
      for name, pattern in [
        ("adapter_dropout_1", r"adapter_config\.json: field 'dropout' must be a finite number >= 0 and < 1, got 1"),
        ("adapter_targets_bogus", r"adapter_config\.json: field 'targets' must be a non-empty list of wq, "),
        ("adapter_r_string", r"adapter_config\.json: field 'r' must be an integer >= 1, got \"2\""),
        ("adapter_scaling_nan", r"adapter_config\.json: field 'rope_scaling' must be a finite number >= 1, got NaN"),
        ("adapter_inf_tensor", r"adapter\.safetensors: tensor norm\.weight holds NaN or infinite values")]],
    # SFT records: every field of the expected type, else the file and the record (its line in a .jsonl) are named
    ("train-sft-input-number", "train", lambda w: train_args(w, w["file"] + "dir7") + ["--sft", "--data", w["sft_input_number.jsonl"]],
     r"sft_input_number\.jsonl:2: field 'input' must be a string or null, got a number \(5\)"),
    ("train-sft-input-list-longalpaca", "train", lambda w: train_args(w, w["file"] + "dir7") + [
        "--sft", "--sft-template", "longalpaca", "--data", w["sft_input_list.json"]],
     r"sft_input_list\.json: record 2: field 'input' must be a string or null, got an array"),
    ("train-sft-no-output", "train", lambda w: train_args(w, w["file"] + "dir7") + ["--sft", "--data", w["sft_no_output.jsonl"]],
     r"sft_no_output\.jsonl:3: field 'output' must be a string, got no such field"),
    ("train-sft-not-an-object", "train", lambda w: train_args(w, w["file"] + "dir7") + ["--sft", "--data", w["sft_not_object.json"]],
     r"sft_not_object\.json: record 2: must be an object \{instruction, input\?, output\}, got a string"),
    # numbers: every numeric flag is parsed by a type that refuses nan, inf and values out of range, naming the flag
    *[(f"train-{flag[2:]}-{v}", "train", (lambda flag, v: lambda w: train_args(w, w["file"] + "dir7") + [flag, v])(flag, v),
       re.escape(flag) + " must be " + re.escape(msg)) for flag, v, msg in [
        ("--grad-clip", "nan", "a finite number >= 0, got nan"), ("--lora-alpha", "0", "a finite number > 0, got 0"),
        ("--lora-dropout", "-1", "a finite number in [0, 1), got -1"), ("--lora-dropout", "nan", "a finite number in [0, 1)"),
        ("--ctx", "1e12", "an integer, got '1e12'"), ("--ctx", str(2**24 + 1), "an integer in [1, 16777216]"),
        ("--beta2", "1", "a finite number in [0, 1), got 1"), ("--heldout", "nan", "a finite number in [0, 1)"),
        ("--eval-samples", "-1", "an integer >= 0"), ("--seed", "-1", "an integer in [0,"), ("--lora-r", "0", "an integer in [1,"),
        ("--min-lr-ratio", "inf", "a finite number in [0, 1]"), ("--weight-decay", "-0.1", "a finite number >= 0")]],
    ("train-sft-template-without-sft", "train", lambda w: train_args(w, w["file"] + "dir7") + ["--sft-template", "longalpaca"],
     r"--sft-template applies to --sft only"),
    ("train-sink-tokens-without-sf", "train", lambda w: train_args(w, w["file"] + "dir7") + ["--attn", "s2", "--sink-tokens", "8"],
     r"--sink-tokens applies to --attn sf only"),
    ("train-shift-wrap-with-full", "train", lambda w: train_args(w, w["file"] + "dir7") + ["--attn", "full", "--shift-wrap"],
     r"--shift-wrap applies to --attn s2 or sf only"),
    *[(f"sample-{flag[2:]}-{v}", "sample", ["--model", "{base}", "--prompt", "hi there", flag, v], re.escape(flag) + " " + msg)
      for flag, v, msg in [
        ("--top-p", "1.5", r"must be a finite number in \(0, 1\], got 1.5"), ("--top-k", "-1", "must be an integer >= 0"),
        ("--max-new-tokens", "0", r"must be an integer in \[1,"), ("--heavy", "nan", "must be a count"),
        ("--recent", "1e9", "must be a count"), ("--prefill-chunk", "0", "must be an integer"), ("--seed", "1.5", "must be an integer"),
        ("--device", "gpu", "gpu: expected cpu, cuda, cuda:N or mps"), ("--device", "meta", "meta: expected cpu, cuda")]],
    ("sample-heavy-with-full-cache", "sample", ["--model", "{base}", "--prompt", "hi there", "--heavy", "0.2"],
     r"--heavy applies to --kv-cache h2o, not full"),
    ("sample-sink-tokens-with-h2o", "sample", ["--model", "{base}", "--prompt", "hi there", "--kv-cache", "h2o", "--sink-tokens", "2"],
     r"--sink-tokens applies to --kv-cache sink, not h2o"),
    *[(f"eval-{flag[2:]}-{v}", "longlora.eval", [task, "--model", "{base}", *(["--data", "{corpus}"] if task == "ppl" else []), flag, v],
       re.escape(flag) + " " + msg) for task, flag, v, msg in [
        ("ppl", "--seq-lens", "32,0", r"must be an integer in \[1, 16777216\], got 0"), ("ppl", "--stride", "-256", "must be an integer"),
        ("ppl", "--batch-size", "0", "must be an integer >= 1"), ("ppl", "--max-tokens", "1", "must be an integer >= 2"),
        ("passkey", "--depths", "0.5,nan", r"must be a finite number in \[0, 1\], got nan"),
        ("passkey", "--trials", "0", "must be an integer >= 1"), ("passkey", "--lengths", "1e12", "must be an integer"),
        ("ppl", "--device", "cuda:x", "cuda:x: expected cpu, cuda")]],
    ("bench-ctx-inf", "longlora.bench", ["train", "--ctx", "inf"], r"--ctx must be an integer, got 'inf'"),
    ("bench-threads-negative", "longlora.bench", ["sample", "--threads", "-2"], r"--threads must be an integer in \[0, 4096\]"),
    ("inspect-seed-negative", "longlora.inspect", ["--seed", "-5"], r"--seed must be an integer in \[0,"),
    ("demo-threads-0", "demo", ["--threads", "0", "--out", "{under}"], r"--threads must be an integer in \[1, 4096\], got 0"),
    ("import-ctx-huge", "longlora.export", ["import", "--peft", "{adapter}", "--base", "{base}", "--ctx", "1000000000000",
                                            "--out", "{file}dir8"], r"--ctx must be an integer in \[1, 16777216\]"),
    ("merge-shard-size-inf", "longlora.export", ["merge", "--base", "{base}", "--adapter", "{adapter}", "--out", "{file}dir8",
                                                "--shard-size", "inf"], r"--shard-size inf: must be a finite size"),
    # bench.py, attention.py, demo.py
    ("bench-train-repeats-0", "longlora.bench", ["train", "--repeats", "0"], r"--repeats must be an integer >= 1, got 0"),
    ("bench-attention-short-T", "longlora.bench", ["attention", "--T", "4"], r"--T must be an integer in \[8, 16777216\], got 4"),
    ("attention-T-1", "longlora.draw", ["--T", "1"], r"--T must be an integer in \[2, 200\], got 1"),
    ("attention-odd-group", "longlora.draw", ["--T", "16", "--group-size", "3"], r"group"),
    ("demo-seeds-0", "demo", ["--seeds", "0", "--out", "{under}"], r"--seeds must be an integer >= 1, got 0"),
    ("demo-missing-corpus", "demo", ["--fast", "--corpus", "{file}nope", "--out", "{file}dir3"], r"--corpus"),
]


def snapshot(root):
    out = {}
    for dirpath, _, names in os.walk(root):
        for n in names:
            p = os.path.join(dirpath, n)
            out[p] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


def run_main(script, argv, capsys):
    import importlib

    module = importlib.import_module(script)
    try:
        code = module.main(argv)
    except SystemExit as e:  # a script that would exit the interpreter: count it as its exit status
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("name,script,argv,pattern", CASES, ids=[c[0] for c in CASES])
def test_a_mistake_is_one_error_line_and_exit_2(world, capsys, name, script, argv, pattern):
    argv = argv(world) if callable(argv) else [a.format(**world) for a in argv]
    root = os.path.dirname(world["base"])
    before = snapshot(root)
    code, out, err = run_main(script, argv, capsys)
    errors = [line for line in err.splitlines() if "error:" in line]
    assert code == 2 and len(errors) == 1 and "Traceback" not in out + err, (code, out[-2000:], err[-2000:])
    assert errors[0].startswith("error: ") and re.search(pattern, errors[0]), errors[0]
    after = snapshot(root)
    assert {p: h for p, h in after.items() if p in before} == before, "a file that existed changed or vanished"


def test_a_broken_model_is_reported_before_the_data_is_tokenized(world, tmp_path, capsys):
    argv = train_args(world, str(tmp_path / "out"))
    argv[argv.index("--model") + 1] = world["hf_no_hidden"]
    argv[argv.index("--token-cache") + 1] = str(tmp_path / "tokens")
    argv += ["--tokenizer", world["tok"]]  # the config alone is broken
    code, out, err = run_main("train", argv, capsys)
    assert code == 2 and "no field 'hidden_size'" in err
    assert not (tmp_path / "tokens").exists()  # nothing was tokenized before the check


@pytest.mark.parametrize("script,argv,pattern", [
    ("sample.py", ["--model", "{base}", "--prompt", "hi", "--temperature", "nan"], r"--temperature must be a finite number >= 0, got nan"),
    ("train.py", ["--model", "{base}", "--data", "{corpus}", "--out", "{under}"], r"--out .*is a file"),
])
def test_a_mistake_from_the_command_line_is_one_line_too(world, script, argv, pattern):
    r = subprocess.run([sys.executable, os.path.join(ROOT, script), *[a.format(**world) for a in argv]],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stdout + r.stderr, r.stderr[-2000:]
    assert len(r.stderr.strip().splitlines()) == 1 and re.search(pattern, r.stderr), r.stderr


def test_a_70b_preset_is_described_without_allocating_it(capsys):
    from longlora import inspect

    assert inspect.main(["--preset", "llama2-70b"]) == 0
    out = capsys.readouterr().out
    assert "68976.65M parameters" in out and "meta device" in out


# ----------------------------------------------------------------------------------------------------
# --help: every default (0 included), which flags are required, and example commands

HELP = [("longlora.inspect", []), ("sample", []), ("longlora.eval", []), ("longlora.eval", ["ppl"]),
        ("longlora.eval", ["passkey"]), ("train", []), ("longlora.export", []), ("longlora.export", ["merge"]),
        ("longlora.export", ["peft"]), ("longlora.export", ["import"]), ("longlora.bench", []),
        ("longlora.bench", ["attention"]), ("longlora.bench", ["train"]), ("longlora.bench", ["sample"]), ("longlora.draw", []),
        ("demo", [])]


@pytest.mark.parametrize("script,sub", HELP, ids=[" ".join([s, *sub]) for s, sub in HELP])
def test_help_shows_every_default_the_required_flags_and_examples(script, sub, monkeypatch, capsys):
    import argparse

    shown = []
    real = argparse.ArgumentParser.print_help
    monkeypatch.setattr(argparse.ArgumentParser, "print_help", lambda self, file=None: (shown.append(self), real(self, file)))
    code, out, err = run_main(script, [*sub, "--help"], capsys)
    assert code == 0 and shown, err
    parser, text = shown[-1], " ".join(out.split())  # argparse wraps lines: compare with whitespace collapsed
    for action in parser._actions:
        if not action.option_strings or any(action.default is v for v in (None, False, argparse.SUPPRESS)):  # 0 counts
            continue
        m = re.search(r"^  " + re.escape(action.option_strings[0]) + r"\b.*?(?=^  -|^\S|\Z)", out, re.M | re.S)
        block = " ".join(m.group(0).split())  # this flag's help, up to the next flag
        values = action.default if isinstance(action.default, (list, tuple)) else [action.default]
        assert all(str(v) in block for v in values), (action.option_strings, action.default, block)
        if action.required:
            assert "(required)" in block, action.option_strings
    assert "examples:" in text and out.split("examples:")[1].count("python") >= 1 + (len(HELP) > 0 and not sub), out


# ----------------------------------------------------------------------------------------------------
# Under torchrun: the error line is printed (once per machine) and is torchrun's "Root Cause"; no rank crashes


@pytest.mark.parametrize("bad,pattern", [
    (["--ctx", "0"], r"--ctx must be an integer in \[1, 16777216\], got 0"),  # every rank finds it in its arguments
    (["--resume", "{corpus}"], r"--resume .*no complete checkpoint"),  # rank 0 alone reads the disk; the others agree
    (["--tokenizer", "{garbage_tok}/tokenizer.model"], r"rank \d: .*tokenizer\.model: not a sentencepiece"),  # every rank reads it
], ids=["bad-ctx", "bad-resume", "bad-tokenizer"])
def test_a_mistake_under_torchrun_is_one_line_per_machine(world, bad, pattern):
    argv = train_args(world, os.path.join(world["file"] + "dir5", "o"), "--steps", "1") + [b.format(**world) for b in bad]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        os.path.join(ROOT, "train.py"), *argv], capture_output=True, text=True, cwd=ROOT, timeout=300)
    ours = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode != 0 and len(ours) == 1 and re.search(pattern, ours[0]), r.stderr[-3000:]
    assert re.search(r"traceback : error: " + pattern, r.stderr), r.stderr[-3000:]  # torchrun's summary names it too
    assert 'train.py", line' not in r.stderr  # no traceback through our code
    codes = re.findall(r"exitcode\s*: (-?\d+)", r.stderr)
    assert codes and set(codes) <= {"2", "-15"}, codes  # exit 2, or stopped by torchrun after another rank's exit 2


# ----------------------------------------------------------------------------------------------------
# A diverged run writes nothing; a damaged newest checkpoint falls back to the previous one


def test_a_diverging_run_stops_before_the_update_and_writes_no_result(world, tmp_path, capsys):
    import train

    out = str(tmp_path / "run")
    code = train.main(train_args(world, out, "--steps", "4", "--save-every", "1", "--warmup", "0", "--lr", "1e30"))
    err = capsys.readouterr().err
    assert code == 2 and err.count("error:") == 1 and "diverged" in err, err
    assert not os.path.exists(os.path.join(out, "adapter.safetensors"))
    ckpts = sorted(os.listdir(os.path.join(out, "checkpoints")))
    assert ckpts == ["step-000001"] and "step-000001 is kept" in err  # step 2 was never applied nor saved


def test_resume_falls_back_from_a_damaged_newest_checkpoint_and_says_so(world, tmp_path, capsys):
    import train

    out = str(tmp_path / "run")
    assert train.main(train_args(world, out, "--steps", "2", "--save-every", "1", "--keep", "2")) == 0
    newest = os.path.join(out, "checkpoints", "step-000002", "optimizer.pt")
    open(newest, "r+b").truncate(100)
    capsys.readouterr()
    assert train.main(train_args(world, out, "--steps", "3", "--save-every", "1", "--keep", "2", "--resume", out)) == 0
    captured = capsys.readouterr()
    assert "step-000002/optimizer.pt: cannot read" in captured.err and "previous checkpoint" in captured.err
    assert f"resumed from {os.path.join(out, 'checkpoints', 'step-000001')} at step 1" in captured.out


def test_sigterm_saves_a_checkpoint_says_how_to_resume_and_resume_works(world, tmp_path):
    import signal

    out = str(tmp_path / "run")
    argv = train_args(world, out, "--steps", "100000", "--save-every", "100000")
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *argv], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, cwd=ROOT)
    for line in p.stdout:  # wait until training runs
        if line.startswith("step 2/"):
            break
    p.send_signal(signal.SIGTERM)  # a preempted job
    rest, err = p.communicate(timeout=120)
    assert p.returncode == 143 and "Traceback" not in err, err
    step = int(re.search(r"stopped at step (\d+)", rest).group(1))
    assert f"--resume {out}" in rest and os.path.isdir(os.path.join(out, "checkpoints", f"step-{step:06d}"))
    import train
    assert train.main(train_args(world, out, "--steps", str(step + 1), "--save-every", "100000", "--resume", out)) == 0


def test_two_runs_cannot_write_one_out_at_the_same_time(world, tmp_path, capsys):
    from longlora import output
    import train

    out = str(tmp_path / "run")
    other = output.lock_output(out, "--out")  # another run, still writing there
    try:
        assert train.main(train_args(world, out, "--steps", "1")) == 2
    finally:
        other.close()
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "another command is writing there now" in err
    assert not os.path.exists(os.path.join(out, "metrics.jsonl"))
    assert train.main(train_args(world, out, "--steps", "1")) == 0  # free again once the other one ends


def test_a_checkpoint_reads_as_the_adapter_the_finished_run_writes(world, tmp_path):
    """sample.py, eval and lora.py merge take a checkpoint, or a run folder without an adapter yet
    (then its newest checkpoint), as --adapter."""
    from longlora.adapter import load_model, read_adapter

    unfinished = str(tmp_path / "run")  # the finished 1-step run, as if it had stopped before writing its adapter
    shutil.copytree(world["run"], unfinished, ignore=shutil.ignore_patterns("adapter*"))
    written = load_model(world["base"], world["run"])  # adapter.safetensors of the finished run
    for path in (unfinished, os.path.join(unfinished, "checkpoints", "step-000001")):
        from_ckpt = load_model(world["base"], path)
        assert from_ckpt.args == written.args
        for (k, a), (k2, b) in zip(from_ckpt.state_dict().items(), written.state_dict().items()):
            assert k == k2 and torch.equal(a, b), k
    assert read_adapter(unfinished)[0]["extra"]["checkpoint"].endswith("step-000001")


def test_the_fast_demo_has_its_own_folder_and_demo_deletes_only_its_own(tmp_path, monkeypatch, capsys):
    """`demo.py --fast` writes out/demo-fast, never the real run's out/demo; a stage folder demo.py did
    not write is refused, not deleted; nor does it write into a foreign --out."""
    import demo

    seen = []
    monkeypatch.setattr(demo, "run", lambda a, held: seen.append(a.out) or 0)
    assert demo.main(["--fast"]) == 0 and demo.main([]) == 0
    assert demo.main(["--corpus", "texts/my books"]) == 0 and demo.main(["--seeds", "3", "--fast"]) == 0
    assert seen == ["out/demo-fast", "out/demo", "out/demo-my_books", "out/demo-fast-seeds3"]
    monkeypatch.undo()

    foreign = tmp_path / "results"
    foreign.mkdir()
    (foreign / "mine.txt").write_text("a user's file")
    with pytest.raises(demo.UsageError, match="not written by demo.py"):
        demo.run_stage("a stage", str(foreign), "stamp", [], None)
    assert demo.main(["--fast", "--out", str(tmp_path)]) == 2  # tmp_path holds `results`, which is not the demo's
    assert "this project did not write" in capsys.readouterr().err
    assert (foreign / "mine.txt").read_text() == "a user's file" and sorted(os.listdir(tmp_path)) == ["results"]


def test_sample_without_model_uses_the_demo_model_or_says_what_to_pass(world, tmp_path, monkeypatch, capsys):
    """`python sample.py --prompt file.txt` after `python demo.py` samples from the demo's best model."""
    import sample

    monkeypatch.chdir(tmp_path)
    (tmp_path / "prompt.txt").write_text("def main(argv=None):\n")
    assert sample.main(["--prompt", "prompt.txt"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pass --model DIR" in err and "python demo.py" in err
    demo_out = tmp_path / "out" / "demo"  # what demo.py leaves: results.json naming the base and the best adapter
    shutil.copytree(world["base"], demo_out / "base")
    shutil.copytree(world["adapter"], demo_out / "runs" / "s2-seed0")
    (demo_out / "results.json").write_text(json.dumps({"sample": {"model": "s2", "base": "base", "adapter": "runs/s2-seed0"}}))
    assert sample.main(["--prompt", "prompt.txt", "--max-new-tokens", "4"]) == 0
    captured = capsys.readouterr()
    assert "--adapter out/demo/runs/s2-seed0" in captured.err and captured.out.strip()


def test_sft_examples_whose_prompt_fills_the_context_are_counted_in_a_note(world, tmp_path, capsys):
    import train

    long_input = open(os.path.join(STDLIB, "argparse.py")).read()[:2000]  # hundreds of tokens: more than --ctx 32
    recs = [{"instruction": "Name a module.", "output": "argparse"}] * 3 + [{"instruction": "Summarize.", "input": long_input,
                                                                             "output": "A parser."}] * 2
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in recs))
    argv = train_args(world, str(tmp_path / "run"), "--steps", "1", "--sft", "--attn", "full")
    argv[argv.index("--data") + 1] = str(data)
    argv[argv.index("--token-cache") + 1] = str(tmp_path / "tokens")
    assert train.main(argv) == 0
    err = capsys.readouterr().err
    assert "note: 2 of 5 SFT examples are left out: their prompt fills --ctx 32" in err, err


def test_a_second_run_waits_for_the_first_tokenizing_into_a_shared_token_cache(world, tmp_path, capsys):
    """A run that shares --token-cache with one still tokenizing (its lock held, its token file half written) is
    not refused: it waits for the lock, then reads what the first wrote instead of tokenizing again."""
    import fcntl
    import threading
    import train

    def argv(out, cache):
        a = train_args(world, str(tmp_path / out), "--steps", "1")
        a[a.index("--token-cache") + 1] = str(tmp_path / cache)
        return a

    assert train.main(argv("run0", "done")) == 0  # the first run's result, and the name of its token file
    name = next(n for n in os.listdir(tmp_path / "done") if n.endswith(".bin"))
    shared = tmp_path / "shared"
    shared.mkdir()
    lock = open(shared / f"{name}.lock", "a")  # the first run, now tokenizing
    fcntl.flock(lock, fcntl.LOCK_EX)
    (shared / f"{name}.tmp.12345").write_bytes(b"\0" * 100)
    first = {}

    def finish():  # it writes its files as data.py does (each by a rename), then lets go of the lock
        first["written meanwhile"] = os.path.exists(shared / name)  # by the second run, which should be waiting
        for n in (name, name + ".json"):
            shutil.copy(tmp_path / "done" / n, shared / (n + ".part"))
            os.replace(shared / (n + ".part"), shared / n)
        os.remove(shared / f"{name}.tmp.12345")
        first["inode"] = os.stat(shared / name).st_ino
        lock.close()

    timer = threading.Timer(2.0, finish)
    timer.start()
    try:
        assert train.main(argv("run1", "shared")) == 0
    finally:
        timer.join()
    err = capsys.readouterr().err
    assert "waiting for another run that is tokenizing into" in err, err
    assert not first["written meanwhile"] and os.stat(shared / name).st_ino == first["inode"]  # read, not written again


def test_resume_with_the_model_and_data_written_as_another_path_to_the_same_files_continues(world, tmp_path, monkeypatch, capsys):
    """--model and --data, relative or absolute or through a symlink, name the same files: resume compares real paths,
    also against a state.json that stored a path as it was typed."""
    import train

    out = str(tmp_path / "run")
    assert train.main(train_args(world, out, "--steps", "1", "--save-every", "1")) == 0  # absolute paths
    monkeypatch.chdir(os.path.dirname(world["base"]))
    relative = train_args(world, out, "--resume", out)
    relative[relative.index("--model") + 1] = os.path.basename(world["base"])
    relative[relative.index("--data") + 1] = os.path.basename(world["corpus"])
    assert train.main(relative + ["--steps", "2", "--save-every", "1"]) == 0
    state_path = os.path.join(out, "checkpoints", "step-000002", "state.json")
    state = json.load(open(state_path))
    state["config"]["model"] = os.path.basename(world["base"])  # as an older state.json holds it: as typed
    json.dump(state, open(state_path, "w"))
    linked = train_args(world, out, "--resume", out, "--steps", "3")
    linked[linked.index("--model") + 1] = world["link_to_base"]
    assert train.main(linked) == 0
    assert "resumed from" in capsys.readouterr().out
