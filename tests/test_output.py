"""Nothing a user has is lost (longlora/output.py): a result appears whole or not at all, even when the command is
killed; an existing result is replaced only with --overwrite, and only if this project wrote it."""

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import ROOT, STDLIB
from longlora import output
from longlora.adapter import save_adapter
from lora import apply_lora, mark_trainable
from model import Transformer, preset


@pytest.fixture(scope="module")
def base(tmp_path_factory, sp_model):
    """A tiny base model, an adapter trained on it (B != 0, so merging changes the weights), a corpus."""
    d = tmp_path_factory.mktemp("output")
    torch.manual_seed(0)
    model = Transformer(preset("tiny", vocab_size=512))
    model.save_pretrained(str(d / "base"), tokenizer_path=sp_model)
    apply_lora(model, r=2, alpha=4)
    mark_trainable(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_b"):
                p.normal_(0, 0.1)
    save_adapter(model, str(d / "adapter"), ctx=128)
    (d / "corpus").mkdir()
    shutil.copy(os.path.join(STDLIB, "argparse.py"), d / "corpus")
    return {"dir": d, "base": str(d / "base"), "adapter": str(d / "adapter"), "corpus": str(d / "corpus"), "tok": sp_model}


def snapshot(folder) -> dict:
    """{relative path: bytes} of every file under `folder`."""
    files = {}
    for root, _, names in os.walk(folder):
        for n in names:
            p = os.path.join(root, n)
            files[os.path.relpath(p, folder)] = open(p, "rb").read()
    return files


def logits(folder):
    x = torch.arange(1, 33).view(1, 32)
    with torch.no_grad():
        return Transformer.from_pretrained(folder).eval()(x)


def merge(w, out, *extra):
    from longlora import export
    return export.main(["merge", "--base", w["base"], "--adapter", w["adapter"], "--out", out, *extra])


# ----------------------------------------------------------------------------------------------------
# An existing result is replaced only when the user asks


def test_a_second_merge_into_one_folder_is_refused_and_the_first_model_is_kept(base, tmp_path, capsys):
    out = str(tmp_path / "merged")
    assert merge(base, out, "--format", "own") == 0
    before = snapshot(out)
    assert merge(base, out, "--format", "meta") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "merged already exists" in err and "--overwrite" in err, err
    assert snapshot(out) == before


def test_overwrite_replaces_a_merge_with_one_layout_only(base, tmp_path):
    out = str(tmp_path / "merged")
    assert merge(base, out, "--format", "own") == 0
    expected = logits(out)
    assert merge(base, out, "--format", "meta", "--overwrite") == 0
    assert sorted(os.listdir(out)) == [output.STAMP, "consolidated.00.pth", "params.json", "tokenizer.model"]
    assert torch.allclose(logits(out), expected, atol=1e-5)
    assert sorted(os.listdir(tmp_path)) == ["merged"]  # nothing left beside it


def test_overwrite_never_replaces_a_folder_this_project_did_not_write(base, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "config.json").write_text("a user's file")
    assert merge(base, str(out), "--overwrite") == 2
    assert "this project did not write" in capsys.readouterr().err
    assert sorted(os.listdir(out)) == ["config.json"] and (out / "config.json").read_text() == "a user's file"


def test_overwrite_never_replaces_a_folder_that_holds_an_input(base, tmp_path, capsys):
    out = tmp_path / "work"
    shutil.copytree(base["base"], out / "base")  # the base model inside the folder the merge would replace
    (out / output.STAMP).touch()
    before = snapshot(out)
    assert merge({**base, "base": str(out / "base")}, str(out), "--overwrite") == 2
    assert "holds --base" in capsys.readouterr().err and snapshot(out) == before


def test_overwrite_through_a_symlink_replaces_what_it_points_to(base, tmp_path):
    real, link = tmp_path / "real", tmp_path / "link"
    assert merge(base, str(real), "--format", "own") == 0
    link.symlink_to(real)
    assert merge(base, str(link), "--format", "meta", "--overwrite") == 0
    assert link.is_symlink() and "params.json" in os.listdir(link) and "consolidated.00.pth" in os.listdir(real)
    assert sorted(os.listdir(tmp_path)) == ["link", "real"]


def test_peft_export_and_import_refuse_an_existing_out_without_overwrite(base, tmp_path, capsys):
    from longlora import export

    out = str(tmp_path / "peft")
    argv = ["peft", "--base", base["base"], "--adapter", base["adapter"], "--out", out]
    assert export.main(argv) == 0
    before = snapshot(out)
    assert export.main(argv) == 2 and "peft already exists" in capsys.readouterr().err
    assert snapshot(out) == before
    imported = str(tmp_path / "imported")
    os.makedirs(imported)
    open(os.path.join(imported, output.STAMP), "w").close()
    shutil.copy(os.path.join(base["adapter"], "adapter_config.json"), imported)  # an adapter this project wrote
    argv = ["import", "--peft", out, "--base", base["base"], "--ctx", "256", "--out", imported]
    assert export.main(argv) == 2 and "imported already exists" in capsys.readouterr().err
    assert export.main(argv + ["--overwrite"]) == 0
    assert sorted(os.listdir(imported)) == [output.STAMP, "adapter.safetensors", "adapter_config.json"]


def test_eval_never_replaces_a_file_unasked_and_never_writes_two_outputs_to_one_path(base, tmp_path, capsys):
    from longlora import eval as ev

    notes = tmp_path / "notes.json"
    notes.write_text("a user's notes")
    argv = ["ppl", "--model", base["base"], "--data", base["corpus"], "--seq-lens", "32", "--stride", "0",
            "--max-tokens", "200", "--out", str(notes)]
    assert ev.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "notes.json already exists" in err and "--overwrite" in err
    assert notes.read_text() == "a user's notes"
    assert ev.main(argv + ["--overwrite"]) == 0 and json.loads(notes.read_text())["task"] == "ppl"
    pic = str(tmp_path / "pic.png")
    assert ev.main(["passkey", "--model", base["base"], "--lengths", "100", "--png", pic, "--out", pic]) == 2
    assert "--out" in capsys.readouterr().err and not os.path.exists(pic)


# ----------------------------------------------------------------------------------------------------
# Training runs


def train_argv(w, out, *extra):
    return ["--model", w["base"], "--data", w["corpus"], "--ctx", "32", "--grad-accum", "1", "--heldout", "0",
            "--steps", "1", "--token-cache", os.path.join(w["dir"], "tokens"), "--out", out, *extra]


def test_full_fine_tuning_into_a_merged_model_is_refused_and_overwrite_replaces_it(base, tmp_path, capsys):
    import train

    out = str(tmp_path / "merged")
    assert merge(base, out, "--format", "meta") == 0
    before = snapshot(out)
    assert train.main(train_argv(base, out, "--full")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "merged already exists" in err, err
    assert snapshot(out) == before
    assert train.main(train_argv(base, out, "--full", "--overwrite")) == 0
    # the base's own layout (here this project's), alone: nothing of the Meta export is left to mix with it
    assert "consolidated.00.pth" not in os.listdir(out) and "model.safetensors" in os.listdir(out)
    Transformer.from_pretrained(out)


def test_a_finished_run_is_continued_with_resume_or_replaced_with_overwrite_never_unasked(base, tmp_path, capsys):
    import train

    out = str(tmp_path / "run")
    assert train.main(train_argv(base, out)) == 0
    shutil.rmtree(os.path.join(out, "checkpoints"))  # even without its checkpoints, the result is not replaced unasked
    before = snapshot(out)
    assert train.main(train_argv(base, out)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds an earlier run and its result" in err and "--overwrite" in err, err
    assert snapshot(out) == before
    assert train.main(train_argv(base, out, "--overwrite", "--resume", out)) == 2
    assert "give one of them" in capsys.readouterr().err
    assert train.main(train_argv(base, out, "--overwrite", "--seed", "7")) == 0
    assert json.load(open(os.path.join(out, "adapter_config.json")))["extra"]["train_args"]["seed"] == 7
    assert os.path.isdir(os.path.join(out, "checkpoints")) and sorted(os.listdir(tmp_path)) == ["run"]


def test_a_resumed_run_replaces_its_result_files_configs_last(base, tmp_path, monkeypatch):
    """A run extended by --resume writes a new result over the old one: however many of the moves happened
    before a kill, the folder loads the old result or none, never the new weights with the old config."""
    from longlora import adapter, run

    old = str(tmp_path / "old")
    shutil.copytree(base["adapter"], old)
    new = str(tmp_path / "new")  # another adapter: other weights, other config
    shutil.copytree(base["adapter"], new)
    weights = os.path.join(new, "adapter.safetensors")
    save_file({k: 2 * v for k, v in load_file(weights).items()}, weights)
    cfg = json.load(open(os.path.join(new, "adapter_config.json")))
    json.dump({**cfg, "ctx": 256}, open(os.path.join(new, "adapter_config.json"), "w"))
    model = Transformer.from_pretrained(base["base"])
    replace = os.replace
    for kill_after in range(len(os.listdir(new))):
        dest, src = str(tmp_path / f"run{kill_after}"), str(tmp_path / f"src{kill_after}")
        shutil.copytree(old, dest)
        shutil.copytree(new, src)
        calls = []

        def killed(a, b, calls=calls, kill_after=kill_after):
            if len(calls) == kill_after:
                raise KeyboardInterrupt
            calls.append(b)
            replace(a, b)

        monkeypatch.setattr(output.os, "replace", killed)
        with pytest.raises(KeyboardInterrupt):
            output.install_files(src, dest, run.RESULT_CONFIGS, ("adapter.safetensors",))
        monkeypatch.setattr(output.os, "replace", replace)
        try:
            adapter.read_adapter(dest)
        except (OSError, ValueError):
            continue  # no result: allowed
        assert snapshot(dest) == snapshot(old), kill_after  # or the old one, whole
    dest, src = str(tmp_path / "run"), str(tmp_path / "src")
    shutil.copytree(old, dest)
    shutil.copytree(new, src)
    output.install_files(src, dest, run.RESULT_CONFIGS, ("adapter.safetensors",))  # uninterrupted: the new one
    assert snapshot(dest) == snapshot(new)
    adapter.load_adapter(model, dest)


# ----------------------------------------------------------------------------------------------------
# A result built aside and renamed into place


def test_a_result_is_renamed_into_place_only_when_complete(tmp_path):
    dest = tmp_path / "result"
    dest.mkdir()
    (dest / output.STAMP).touch()
    (dest / "config.json").write_text("old")
    with pytest.raises(RuntimeError):
        with output.building(str(dest), overwrite=True) as tmp:
            open(os.path.join(tmp, "config.json"), "w").write("new, half")
            raise RuntimeError("killed while writing")
    assert (dest / "config.json").read_text() == "old" and sorted(os.listdir(tmp_path)) == ["result"]
    with output.building(str(dest), overwrite=True) as tmp:
        assert os.path.dirname(tmp) == str(tmp_path) and not os.path.exists(os.path.join(tmp, "config.json"))
        open(os.path.join(tmp, "config.json"), "w").write("new")
    assert (dest / "config.json").read_text() == "new" and sorted(os.listdir(tmp_path)) == ["result"]


def test_a_result_that_appeared_meanwhile_is_not_replaced_without_overwrite(tmp_path):
    for is_dir in (True, False):
        dest = tmp_path / f"result{is_dir}"
        with pytest.raises(output.UsageError, match="written by another command while this one ran"):
            with output.building(str(dest), is_dir=is_dir) as tmp:
                if is_dir:
                    dest.mkdir()
                    (dest / "theirs.json").write_text("theirs")
                else:
                    dest.write_text("theirs")
                open(os.path.join(tmp, "x") if is_dir else tmp, "w").write("ours")
        assert (dest / "theirs.json" if is_dir else dest).read_text() == "theirs"


SLOW_SAVES = """
import sys, time
import safetensors.torch as st
save = st.save_file
def slow(*a, **k):  # a disk that takes its time: the test can kill the command while a file is being written
    save(*a, **k)
    time.sleep(0.4)
st.save_file = slow
sys.path.insert(0, {root!r})
from longlora import export
sys.exit(export.main(sys.argv[1:]))
"""


def kill_while_writing(argv, dest, min_files):
    """Run `python lora.py ARGV` with slow safetensors saves; SIGKILL it once the result being built beside `dest`
    holds min_files safetensors files (the last one still under its temporary name). Returns their names."""
    p = subprocess.Popen([sys.executable, "-c", SLOW_SAVES.format(root=ROOT), *argv], cwd=ROOT,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    partial = os.path.join(os.path.dirname(dest), f".{os.path.basename(dest)}.partial-{p.pid}")
    deadline = time.time() + 120
    while time.time() < deadline and p.poll() is None:
        have = [n for n in os.listdir(partial) if ".safetensors" in n] if os.path.isdir(partial) else []
        if len(have) >= min_files:
            p.send_signal(signal.SIGKILL)
            p.wait()
            return have
        time.sleep(0.02)
    raise AssertionError(f"the command ended ({p.poll()}) before it could be killed: {p.stderr.read()}")


def test_a_merge_killed_while_writing_shards_leaves_the_old_model_that_loads_as_before(base, tmp_path):
    out = str(tmp_path / "merged")
    assert merge(base, out, "--shard-size", "20KB") == 0
    before, expected = snapshot(out), logits(out)
    other = str(tmp_path / "adapter2")  # another adapter: a merge with it differs from the first
    shutil.copytree(base["adapter"], other)
    written = kill_while_writing(["merge", "--base", base["base"], "--adapter", other, "--out", out, "--shard-size",
                                  "20KB", "--overwrite"], out, min_files=3)
    assert len(written) >= 3
    assert snapshot(out) == before and torch.equal(logits(out), expected)
    # the next command writing there removes what the killed one left beside it
    assert merge(base, out, "--shard-size", "20KB", "--overwrite") == 0
    assert sorted(os.listdir(tmp_path)) == ["adapter2", "merged"]


def test_an_export_killed_while_writing_leaves_nothing_that_loads(base, tmp_path):
    out = str(tmp_path / "peft")
    kill_while_writing(["peft", "--base", base["base"], "--adapter", base["adapter"], "--out", out], out, min_files=1)
    assert not os.path.exists(out)
    from longlora import export
    assert export.main(["peft", "--base", base["base"], "--adapter", base["adapter"], "--out", out]) == 0
    assert sorted(os.listdir(tmp_path)) == ["peft"]  # what the killed one left beside it is gone


# ----------------------------------------------------------------------------------------------------
# A file system without flock, a machine that does not share rank 0's disk


def test_without_flock_an_owner_file_locks_the_folder_and_a_killed_owner_is_taken_over(tmp_path, monkeypatch, capsys):
    def no_flock(f, how):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(output.fcntl, "flock", no_flock)
    out = str(tmp_path / "run")
    first = output.lock_output(out, "--out")
    assert "does not lock files (No locks available)" in capsys.readouterr().err
    with pytest.raises(output.UsageError, match=f"another command is writing there now .*{socket.gethostname()} pid {os.getpid()}"):
        output.lock_output(out, "--out")
    first.close()
    with output.lock_output(out, "--out"):  # free again
        pass
    owner = os.path.join(out, output.STAMP + ".owner")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    open(owner, "w").write(f"{socket.gethostname()} {dead.stdout.strip()}")  # left by a killed command of this host
    with output.lock_output(out, "--out"):
        assert open(owner).read() == f"{socket.gethostname()} {os.getpid()}"
    open(owner, "w").write(f"another-host {os.getpid()}")  # its process cannot be seen from here: never taken over
    with pytest.raises(output.UsageError, match="another-host pid"):
        output.lock_output(out, "--out")


def test_without_flock_a_shared_token_file_is_made_without_waiting_and_with_a_warning(sp_model, tmp_path, monkeypatch,
                                                                                      capsys):
    from conftest import stdlib_text
    from longlora.data import prepare_tokens
    from longlora.tokenizer import Tokenizer

    tok, doc = Tokenizer(sp_model), tmp_path / "doc.txt"
    doc.write_text(stdlib_text(("bisect.py",)))
    want = tok.encode(doc.read_text(), bos=True, eos=True)

    def no_flock(f, how):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(output.fcntl, "flock", no_flock)
    assert prepare_tokens([str(doc)], tok, str(tmp_path / "t.bin")).tolist() == want
    assert "does not lock files (No locks available)" in capsys.readouterr().err


def test_a_run_folder_holding_only_another_machines_token_cache_is_accepted_and_nothing_more(base, tmp_path, capsys):
    """Without a shared disk, rank 0's machine holds the run (metrics, checkpoints, result); every other machine's
    --out holds only its token cache, and a rerun or --resume must be accepted there too."""
    import train

    from longlora.data import prepare_tokens
    from longlora.tokenizer import Tokenizer

    out = tmp_path / "run"
    (out / "tokens").mkdir(parents=True)  # a machine's cache, as load_data writes it
    prepare_tokens([base["corpus"]], Tokenizer(base["tok"]), str(out / "tokens" / "train.bin"))
    assert any(n.endswith(".bin.json") for n in os.listdir(out / "tokens"))
    argv = ["--model", base["base"], "--data", base["corpus"], "--ctx", "32", "--steps", "1", "--heldout", "0",
            "--out", str(out)]
    from longlora.run import parse_args

    parse_args(argv, train.RECIPE)  # accepted: no error
    (out / "notes.txt").write_text("a user's file")
    with pytest.raises(output.UsageError, match="did not write"):
        parse_args(argv, train.RECIPE)
