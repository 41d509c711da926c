"""demo.py: the miniature reproduction runs end to end (--fast), its outputs agree, and it is deterministic.

The --fast run goes through the real train.py / eval.py / sample.py code paths with a tiny model, so
these tests also catch a demo that no longer fits the files it calls.
"""

import json
import math
import os
import re
import shutil
import sys

import pytest
import torch

import demo
from conftest import STDLIB


@pytest.fixture(scope="module")
def fast_runs(tmp_path_factory):
    """Two independent --fast runs from scratch (nothing cached between them)."""
    outs = []
    for i in range(2):
        out = tmp_path_factory.mktemp(f"demo{i}")
        assert demo.main(["--fast", "--out", str(out), "--threads", "1"]) == 0
        outs.append(out)
    return outs


def _table_rows(md: str) -> dict:
    """{model name: [cell, ...]} from the first Markdown table (perplexity, passkey, share)."""
    rows = {}
    for line in md.split("\n\n")[1].splitlines():
        if line.startswith("| ") and not line.startswith("| model") and not line.startswith("| ---"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    return rows


def test_demo_table_has_every_model_and_length_with_finite_numbers(fast_runs):
    out = fast_runs[0]
    res = json.loads((out / "results.json").read_text())
    expected = [demo.BASE, demo.BASELINE, *demo.VARIANTS]
    assert list(res["models"]) == expected
    short = res["lengths"][0]
    assert res["lengths"] == [short, 2 * short, 4 * short]
    for name, m in res["models"].items():
        n_values = 1 if name in (demo.BASE, demo.BASELINE) else len(res["seeds"])
        for n in res["lengths"]:
            assert len(m["ppl"][str(n)]) == n_values
            assert all(math.isfinite(v) and v > 1 for v in m["ppl"][str(n)]), (name, n, m["ppl"])
            assert all(v is None or 0 <= v <= 1 for v in m["passkey"][str(n)])
        assert len(m["passkey"][str(res["lengths"][-1])]) == n_values
        assert all(v is not None for v in m["passkey"][str(res["lengths"][-1])])  # a prompt fits the long context
    assert len(res["seeds"]) == 2
    # full attention's share of its own improvement is 1 by definition; the others are finite
    assert all(abs(v - 1) < 1e-9 for v in res["models"]["full attn"]["share"])
    assert all(math.isfinite(v) for k in demo.VARIANTS for v in res["models"][k]["share"])


def test_demo_markdown_table_matches_the_json(fast_runs):
    out = fast_runs[0]
    res = json.loads((out / "results.json").read_text())
    rows = _table_rows((out / "results.md").read_text())
    assert list(rows) == list(res["models"])
    for name, m in res["models"].items():
        for i, n in enumerate(res["lengths"]):
            shown = [float(x) for x in rows[name][i].split(" / ")]
            assert shown == pytest.approx(m["ppl"][str(n)], abs=0.005 + 1e-9)
            shown = [None if x == "-" else float(x) for x in rows[name][len(res["lengths"]) + i].split(" / ")]
            assert shown == [None if v is None else pytest.approx(v, abs=0.005 + 1e-9) for v in m["passkey"][str(n)]]
        if name in demo.VARIANTS:
            shown = [float(x) for x in rows[name][-1].split(" / ")]
            assert shown == pytest.approx(m["share"], abs=0.005 + 1e-9)


def test_demo_share_follows_sinklora_definition(fast_runs):
    # recomputed here from the perplexities in the JSON, independently of demo.py's own arithmetic
    res = json.loads((fast_runs[0] / "results.json").read_text())
    long = str(res["lengths"][-1])
    b = res["models"][demo.BASELINE]["ppl"][long][0]
    for name in demo.VARIANTS:
        for s, v in enumerate(res["models"][name]["share"]):
            f = res["models"]["full attn"]["ppl"][long][s]
            assert v == pytest.approx((b - res["models"][name]["ppl"][long][s]) / (b - f))


def test_demo_training_summary_is_lora_vs_lora_plus_vs_full_fine_tuning_per_seed(fast_runs):
    # recomputed from the perplexities in the JSON; the names say which run is which
    res = json.loads((fast_runs[0] / "results.json").read_text())
    long = str(res["lengths"][-1])
    lora, plus, full = (res["models"][k]["ppl"][long] for k in ("s2, plain LoRA", "s2", "s2, full FT"))
    t = res["training"]
    for s in range(len(res["seeds"])):
        assert t["lora_to_lora_plus"][s] == pytest.approx(plus[s] - lora[s])
        assert t["lora_plus_to_full_ft"][s] == pytest.approx(full[s] - plus[s])
        assert t["gap_closed"][s] == pytest.approx((lora[s] - plus[s]) / (lora[s] - full[s]))
    md = (fast_runs[0] / "results.md").read_text()
    assert "LoRA+ closes " + " / ".join(f"{v:.2f}" for v in t["gap_closed"]) in md


def test_demo_trains_plain_lora_lora_plus_and_every_weight_as_named(fast_runs):
    """The rows are what they say: plain LoRA's adapter holds LoRA matrices only, LoRA+'s also the embeddings and
    norms, and full fine-tuning changed the weights LoRA never touches (the feed-forward's)."""
    from safetensors.torch import load_file

    runs = fast_runs[0] / "runs"
    plain = load_file(runs / "s2-plain-LoRA-seed0" / "adapter.safetensors")
    plus = load_file(runs / "s2-seed0" / "adapter.safetensors")
    assert plain and all("lora_" in k for k in plain)
    assert "tok_embeddings.weight" in plus and "norm.weight" in plus
    base = load_file(fast_runs[0] / "base" / "model.safetensors")
    full = load_file(runs / "s2-full-FT-seed0" / "model.safetensors")
    assert full.keys() == base.keys()
    assert not torch.equal(full["layers.0.feed_forward.w1.weight"], base["layers.0.feed_forward.w1.weight"])
    # full fine-tuning at its own learning rate (its flags override the common ones), the LoRA runs at the common one
    peak_lr = lambda run: max(json.loads(line)["lr"] for line in (runs / run / "metrics.jsonl").read_text().splitlines())
    assert peak_lr("s2-full-FT-seed0") == pytest.approx(3e-4) and peak_lr("s2-seed0") == pytest.approx(3e-3)


def test_demo_loss_by_position_agrees_with_the_perplexity_and_the_table(fast_runs):
    res = json.loads((fast_runs[0] / "results.json").read_text())
    L, bounds = res["lengths"], res["positions"]
    assert bounds == [round(k * L[-1] / demo.BUCKETS) for k in range(demo.BUCKETS + 1)]
    rows = _table_rows((fast_runs[0] / "results.md").read_text().split("by position")[1])
    assert list(rows) == list(res["models"])
    for name, m in res["models"].items():
        for s, losses in enumerate(m["position_loss"]):
            # the spans' losses, weighted by how many tokens each predicts (position 0 is never predicted), are the
            # window loss: exp of it is the perplexity at the longest length
            counts = [hi - max(lo, 1) for lo, hi in zip(bounds, bounds[1:])]
            mean = sum(c * x for c, x in zip(counts, losses)) / sum(counts)
            assert math.exp(mean) == pytest.approx(m["ppl"][str(L[-1])][s], rel=1e-6)
        mean = [sum(v) / len(v) for v in zip(*m["position_loss"])]
        assert [float(x) for x in rows[name][:-1]] == pytest.approx(mean, abs=0.0005 + 1e-9)
        if name in demo.VARIANTS:  # the last span against full attention's, seed by seed
            reference = res["models"]["full attn"]["position_loss"]
            assert [float(x) for x in rows[name][-1].split(" / ")] == pytest.approx(
                [v[-1] - r[-1] for v, r in zip(m["position_loss"], reference)], abs=0.0005 + 1e-9)


def test_demo_is_deterministic_across_fresh_runs(fast_runs):
    a, b = (o / "results.md" for o in fast_runs)
    assert a.read_text() == b.read_text()
    assert (fast_runs[0] / "sample.txt").read_text() == (fast_runs[1] / "sample.txt").read_text()


def test_demo_rerun_reuses_the_cached_models_and_gives_the_same_table(fast_runs, tmp_path, capsys):
    out = tmp_path / "rerun"
    shutil.copytree(fast_runs[0], out)
    table = (out / "results.md").read_text()
    (out / "results.md").unlink()
    assert demo.main(["--fast", "--out", str(out), "--threads", "1"]) == 0
    log = capsys.readouterr().out
    assert log.count(": cached in ") == 1 + 2 * len(demo.VARIANTS)  # the base and every adapter
    assert "train.py --" not in log  # nothing was trained again
    assert (out / "results.md").read_text() == table


def test_demo_with_other_settings_never_touches_an_earlier_run(fast_runs, tmp_path, capsys):
    """Other settings (here --seeds; also --corpus, --fast, a changed SETTINGS) in the folder of a finished run are
    refused before any work, and the run is kept byte for byte; --overwrite replaces it."""
    out = tmp_path / "rerun"
    shutil.copytree(fast_runs[0], out)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert demo.main(["--fast", "--out", str(out), "--seeds", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds a demo run with other settings" in err and "--overwrite" in err, err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert demo.main(["--fast", "--out", str(out), "--seeds", "1", "--overwrite", "--threads", "1"]) == 0
    assert json.loads((out / "results.json").read_text())["seeds"] == [0]
    assert os.listdir(tmp_path) == ["rerun"]  # the earlier run, set aside, is gone


def test_demo_writes_a_sample_and_a_plot(fast_runs):
    import matplotlib  # noqa: F401  (a test requirement: requirements-test.txt; optional for the demo itself)

    out = fast_runs[0]
    res = json.loads((out / "results.json").read_text())
    assert res["sample"]["model"] in demo.VARIANTS and res["sample"]["continuation"].strip()
    assert res["sample"]["continuation"] in (out / "sample.txt").read_text()
    assert res["plot"] is True and (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_without_matplotlib_writes_no_plot_and_says_so(fast_runs, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    res = json.loads((fast_runs[0] / "results.json").read_text())
    assert demo.plot_results(res, str(tmp_path / "results.png")) is False and not (tmp_path / "results.png").exists()


def test_demo_split_is_deterministic_and_disjoint():
    train, heldout = demo.read_corpus(STDLIB, stdlib=True)
    names_t, names_h = {p for p, _ in train}, {p for p, _ in heldout}
    assert not names_t & names_h
    assert all(demo.is_heldout(p) for p in names_h) and not any(demo.is_heldout(p) for p in names_t)
    assert not any(re.search(r"(^|/)(test|tests|idle_test|site-packages)/", p) for p in names_t | names_h)
    assert 0.05 < len(heldout) / (len(train) + len(heldout)) < 0.15
    assert demo.read_corpus(STDLIB, stdlib=True) == (train, heldout)


def test_demo_small_user_corpus_is_split_inside_the_files(tmp_path):
    text = "".join(f"line {i} of a user's own document\n" for i in range(200))
    (tmp_path / "notes.txt").write_text(text)
    (tmp_path / "image.bin").write_bytes(bytes(range(256)))  # not text: ignored
    train, heldout = demo.read_corpus(str(tmp_path), stdlib=False)
    assert [p for p, _ in train] == ["notes.txt"] == [p for p, _ in heldout]
    assert train[0][1] + heldout[0][1] == text and len(heldout[0][1]) < len(text) / 5


def test_demo_share_of_improvement_by_hand():
    assert demo.share_of_improvement(30.0, 25.0, 20.0) == pytest.approx(0.5)
    assert demo.share_of_improvement(30.0, 20.0, 20.0) == pytest.approx(1.0)


def test_demo_rejects_a_missing_corpus_with_one_line(tmp_path, capsys):
    assert demo.main(["--fast", "--corpus", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "nope" in err and err.count("\n") == 1


def test_demo_rejects_too_little_held_out_text_before_training(tmp_path, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "notes.txt").write_text("".join(f"line {i} of a short document\n" for i in range(300)))
    assert demo.main(["--fast", "--corpus", str(corpus), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith("error: ") and "held-out" in err and err.count("error:") == 1
    assert not (tmp_path / "o" / "base").exists()  # stopped before pre-training
