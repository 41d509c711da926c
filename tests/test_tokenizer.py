"""longlora/tokenizer.py: an HF tokenizer.json gives transformers' ids (BOS by tokenizer_config.json's flags or
the post-processor, as transformers decides), its chat template renders to transformers' apply_chat_template ids,
generation_config.json's EOS list ends a generation, and a checkpoint's tokenizer is found whichever kind it is.
(The real SmolLM2 tokenizer against transformers: test_smollm2.py.)"""

import json
import os
import shutil

import pytest

from conftest import stdlib_text
from longlora.tokenizer import Tokenizer, find_tokenizer


def variant(src, dst, **config):
    """A copy of the tokenizer folder src with tokenizer_config.json's fields changed (None removes one)."""
    shutil.copytree(src, dst)
    path = os.path.join(dst, "tokenizer_config.json")
    old = json.load(open(path))
    old.update(config)
    json.dump({k: v for k, v in old.items() if v is not None}, open(path, "w"))
    return str(dst)


def hf_ids(folder, text, **kw):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)(text, **kw)["input_ids"]


def bos_from_post_processor(folder):
    """tokenizer.json's post-processor puts the BOS in front of a text (as Llama 3's does)."""
    from tokenizers import Tokenizer as HFTokenizer, processors

    tok = HFTokenizer.from_file(os.path.join(folder, "tokenizer.json"))
    tok.post_processor = processors.TemplateProcessing(single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", 0)])
    tok.save(os.path.join(folder, "tokenizer.json"))
    return folder


@pytest.mark.parametrize("case", ["no_bos", "post_processor_bos", "config_flags_ignored"])
def test_ids_equal_transformers_with_bos_where_the_post_processor_puts_it(case, hf_tokenizer, tmp_path):
    """tokenizer.json's post-processor says whether a text starts with BOS; transformers ignores
    tokenizer_config.json's add_bos_token / add_eos_token beside a tokenizer.json, and so must we."""
    folder = {"no_bos": lambda d: variant(hf_tokenizer, d),
              "post_processor_bos": lambda d: bos_from_post_processor(variant(hf_tokenizer, d)),
              "config_flags_ignored": lambda d: variant(hf_tokenizer, d, add_bos_token=True, add_eos_token=True)}[case](
        tmp_path / "tok")
    tok = Tokenizer(folder)
    text = stdlib_text(("json/__init__.py",))[:4000] + "\nnaïve café, 日本語 🙂 <|im_end|> x"
    assert tok.encode(text, bos=True) == hf_ids(folder, text)
    assert tok.encode(text, bos=False) == hf_ids(folder, text, add_special_tokens=False)
    assert (tok.encode("a")[0] == tok.bos_id) == (case == "post_processor_bos")
    assert tok.decode(tok.encode(text, bos=False)) == text


def test_special_tokens_and_generation_ends_come_from_the_config_files(hf_tokenizer):
    tok = Tokenizer(hf_tokenizer)
    vocab = json.load(open(os.path.join(hf_tokenizer, "tokenizer.json")))["model"]["vocab"]
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (vocab["<|endoftext|>"], vocab["<|im_end|>"], vocab["<|endoftext|>"])
    assert tok.eos_ids == {2, 0}  # generation_config.json's list, with the EOS
    assert tok.vocab_size == 600 and tok.encode("x", bos=False, eos=True)[-1] == tok.eos_id


def messages():
    return [[{"role": "system", "content": "You answer in one word."},
             {"role": "user", "content": "  What is the capital of France?\n"},
             {"role": "assistant", "content": "Paris.", "meta": {"ville": "Paris", "note": "été"}},
             {"role": "user", "content": ""},  # skipped by the template's {% continue %}
             {"role": "user", "content": "And of Japan?", "name": None}],  # None-valued keys are dropped
            [{"role": "user", "content": "Hi"}]]


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_gives_transformers_apply_chat_template_ids(add_generation_prompt, hf_tokenizer):
    from transformers import AutoTokenizer

    tok, hf = Tokenizer(hf_tokenizer), AutoTokenizer.from_pretrained(hf_tokenizer)
    for chat in messages():
        expected = hf.apply_chat_template(chat, add_generation_prompt=add_generation_prompt, tokenize=False)
        assert tok.render_chat(chat, add_generation_prompt) == expected
        assert tok.apply_chat_template(chat, add_generation_prompt) == hf.apply_chat_template(
            chat, add_generation_prompt=add_generation_prompt, return_dict=False)
    assert '{"ville": "Paris", "note": "été"}' in tok.render_chat(messages()[0])  # tojson keeps "é"


def test_chat_template_errors_are_one_line_naming_the_file(hf_tokenizer, tmp_path):
    tok = Tokenizer(hf_tokenizer)
    with pytest.raises(ValueError, match=r"tokenizer\.json: chat template: roles must be user or assistant, not tool"):
        tok.render_chat([{"role": "tool", "content": "42"}])
    broken = Tokenizer(variant(hf_tokenizer, tmp_path / "broken", chat_template="{% for m in messages %}"))
    with pytest.raises(ValueError, match="chat template: .*endfor"):
        broken.render_chat([{"role": "user", "content": "x"}])


def test_a_chat_template_jinja_file_is_the_template(hf_tokenizer, tmp_path):
    folder = variant(hf_tokenizer, tmp_path / "tok", chat_template=None)
    assert Tokenizer(folder).chat_template is None
    (tmp_path / "tok" / "chat_template.jinja").write_text("{% for m in messages %}[{{ m['content'] }}]{% endfor %}")
    assert Tokenizer(folder).render_chat([{"role": "user", "content": "x"}]) == "[x]"


def test_the_tokenizer_is_found_next_to_the_weights_or_one_folder_up(hf_tokenizer, sp_model, tmp_path):
    both = tmp_path / "both"
    shutil.copytree(hf_tokenizer, both)
    shutil.copy(sp_model, both / "tokenizer.model")
    assert find_tokenizer(str(both)) == str(both / "tokenizer.json")  # what transformers loads
    assert hasattr(Tokenizer(str(both)), "hf") and hasattr(Tokenizer(str(both / "tokenizer.model")), "sp")
    (tmp_path / "meta" / "7B").mkdir(parents=True)
    shutil.copy(sp_model, tmp_path / "meta" / "tokenizer.model")  # Meta's download
    assert find_tokenizer(str(tmp_path / "meta" / "7B")) == str(tmp_path / "meta" / "tokenizer.model")
    assert find_tokenizer(str(tmp_path / "meta")) == str(tmp_path / "meta" / "tokenizer.model")
    (tmp_path / "none" / "x").mkdir(parents=True)
    assert find_tokenizer(str(tmp_path / "none" / "x")) is None
    with pytest.raises(FileNotFoundError, match="no tokenizer.json or tokenizer.model"):
        Tokenizer(str(tmp_path / "none"))


def test_a_file_that_is_not_a_tokenizer_is_one_line(tmp_path):
    (tmp_path / "tokenizer.json").write_text('{"not": "a tokenizer"}')
    with pytest.raises(ValueError, match=r"tokenizer\.json: not a tokenizers tokenizer\.json"):
        Tokenizer(str(tmp_path))


def test_a_tokenizer_fits_an_embedding_with_padding_rows_but_not_another_models():
    from types import SimpleNamespace

    from longlora.weights import CheckpointError, check_tokenizer_fits

    check_tokenizer_fits(SimpleNamespace(vocab_size=151665, path="qwen"), 151936)  # Qwen2.5 pads 271 rows
    check_tokenizer_fits(SimpleNamespace(vocab_size=32000, path="llama"), 32001)  # LongLoRA's added [PAD]
    for ours, theirs in ((512, 2048), (49153, 49152), (32000, 128256)):
        with pytest.raises(CheckpointError, match="does not fit"):
            check_tokenizer_fits(SimpleNamespace(vocab_size=ours, path="t"), theirs)
