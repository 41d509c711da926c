"""
Tokenizers: LLaMA's sentencepiece tokenizer.model, or an HF tokenizer.json (Llama 3, Mistral, Qwen2.5, SmolLM2:
byte-level BPE and others, through the `tokenizers` library) with the special tokens and chat template of its
tokenizer_config.json. One interface for both, found next to the weights:

    tok = Tokenizer("llama-2-7b/tokenizer.model")        # or "SmolLM2-135M-Instruct/" or ".../tokenizer.json"
    ids = tok.encode("The capital of France is")           # [1, ...]: the BOS first, if the model puts one there
    text = tok.decode(ids)
    ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}])   # the model's own chat template

    tok.bos_id, tok.eos_id      the BOS / EOS token (-1: none); data.py ends documents and answers with eos_id
    tok.eos_ids                 every token that ends a generation (generation_config.json may name several)
    tok.pad_id, tok.vocab_size  the padding token (-1: none); ids are < vocab_size
    tok.path, tok.files         the tokenizer file; {name: path} of every file an export copies next to the weights

An HF tokenizer encodes and decodes as transformers' AutoTokenizer does (tests/test_smollm2.py compares the ids),
and renders the chat template as transformers' apply_chat_template does (see render_chat).
"""

import json
import os
from typing import Optional

from longlora.cli import one_line

# The files of a tokenizer, as transformers saves them; an export copies those present.
HF_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
            "chat_template.jinja")


def find_tokenizer(path) -> Optional[str]:
    """The tokenizer of the checkpoint folder `path`: tokenizer.json (what transformers loads) or tokenizer.model,
    next to the weights or in the parent folder (Meta's download puts tokenizer.model there)."""
    for folder in (path, os.path.dirname(os.path.abspath(path))):
        for name in ("tokenizer.json", "tokenizer.model"):
            if os.path.isfile(os.path.join(folder, name)):
                return os.path.join(folder, name)
    return None


def _read_json(path) -> dict:
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read JSON ({one_line(e)})") from None


def _content(token) -> Optional[str]:
    """A special token as tokenizer_config.json writes it: a string, or {"content": ...} (older files)."""
    return token.get("content") if isinstance(token, dict) else token


class Tokenizer:
    """encode(text, bos, eos) -> ids, decode(ids) -> text, apply_chat_template(messages) -> ids.

    `path`: a sentencepiece model file, a tokenizer.json, or a folder holding one (tokenizer.json first)."""

    def __init__(self, path: str):
        if os.path.isdir(path):
            found = [os.path.join(path, n) for n in ("tokenizer.json", "tokenizer.model") if os.path.isfile(os.path.join(path, n))]
            if not found:
                raise FileNotFoundError(f"{path}: no tokenizer.json or tokenizer.model in it")
            path = found[0]
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no such tokenizer file")
        self.path, folder = path, os.path.dirname(path)
        # the configs beside it: copied by exports; an HF tokenizer also reads them
        self.files = {n: os.path.join(folder, n) for n in HF_FILES if n != "tokenizer.json" and os.path.isfile(os.path.join(folder, n))}
        self.chat_template = None
        if path.endswith(".json"):
            self._load_hf(path, folder)
        else:
            self._load_sentencepiece(path)

    def _load_sentencepiece(self, path):
        import sentencepiece as spm

        try:
            self.sp = spm.SentencePieceProcessor(model_file=path)
        except (RuntimeError, OSError) as e:  # sentencepiece raises RuntimeError("Internal: ...") on a foreign file
            raise ValueError(f"{path}: not a sentencepiece tokenizer model ({one_line(e)})") from None
        self.files["tokenizer.model"] = path
        self.vocab_size = self.sp.vocab_size()
        self.bos_id, self.eos_id, self.pad_id = self.sp.bos_id(), self.sp.eos_id(), self.sp.pad_id()
        self.eos_ids = {self.eos_id} - {-1}
        self.add_bos = self.bos_id >= 0  # LLaMA puts BOS at the start of every text
        self._encode = self.sp.encode
        self._decode = self.sp.decode

    def _load_hf(self, path, folder):
        """tokenizer.json, with what transformers takes from the files beside it: the special tokens, whether a
        text starts with BOS, the chat template, and the tokens that end a generation."""
        from tokenizers import AddedToken
        from tokenizers import Tokenizer as HFTokenizer

        try:
            self.hf = HFTokenizer.from_file(path)
        except Exception as e:  # the Rust library raises its own Exception type on a foreign file
            raise ValueError(f"{path}: not a tokenizers tokenizer.json ({one_line(e)})") from None
        self.files["tokenizer.json"] = path
        config = _read_json(os.path.join(folder, "tokenizer_config.json"))
        special = {**_read_json(os.path.join(folder, "special_tokens_map.json")), **config}
        # Added tokens the config lists that tokenizer.json lacks are added, as transformers does.
        known = self.hf.get_vocab(with_added_tokens=True)
        for _, t in sorted(config.get("added_tokens_decoder", {}).items(), key=lambda kv: int(kv[0])):
            if t.get("content") not in known:
                self.hf.add_tokens([AddedToken(t["content"], single_word=t.get("single_word", False), lstrip=t.get("lstrip", False),
                                               rstrip=t.get("rstrip", False), normalized=t.get("normalized", not t.get("special")),
                                               special=t.get("special", False))])
        vocab = self.hf.get_vocab(with_added_tokens=True)
        self.vocab_size = max(vocab.values()) + 1
        # The special tokens' strings, which chat templates use as variables (bos_token, eos_token, ...).
        self.special_tokens = {k: _content(special.get(k)) for k in ("bos_token", "eos_token", "unk_token", "pad_token")
                               if _content(special.get(k)) is not None}
        token_id = lambda name: vocab.get(self.special_tokens.get(name), -1)
        self.bos_id, self.eos_id, self.pad_id = token_id("bos_token"), token_id("eos_token"), token_id("pad_token")
        # Whether a text starts with BOS is tokenizer.json's post-processor's to say (as for Llama 3's
        # "<|begin_of_text|> $A"). transformers 5 ignores tokenizer_config.json's add_bos_token and add_eos_token
        # when there is a tokenizer.json (saving bakes them into its post-processor), and so do we.
        bare, full = self.hf.encode("a", add_special_tokens=False).ids, self.hf.encode("a").ids
        self.add_bos = self.bos_id >= 0 and full[:1] == [self.bos_id] != bare[:1]
        generation = _read_json(os.path.join(folder, "generation_config.json")).get("eos_token_id")
        generation = generation if isinstance(generation, list) else [] if generation is None else [generation]
        self.eos_ids = ({self.eos_id} | set(generation)) - {-1}
        if os.path.isfile(os.path.join(folder, "chat_template.jinja")):  # transformers' newer place for it
            with open(os.path.join(folder, "chat_template.jinja"), encoding="utf-8") as f:
                self.chat_template = f.read()
        else:
            template = config.get("chat_template")
            if isinstance(template, list):  # several named templates: the default one
                template = next((t["template"] for t in template if t.get("name") == "default"), None)
            self.chat_template = template
        self._encode = lambda text: self.hf.encode(text, add_special_tokens=False).ids
        # as transformers' decode: special tokens are shown (generation stops before an EOS is decoded)
        self._decode = lambda ids: self.hf.decode(ids, skip_special_tokens=False)

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list:
        """Token ids of text. bos: the text starts a sequence, so it gets the BOS if this tokenizer puts one
        there (LLaMA does; SmolLM2 and Qwen2.5 do not); eos: append the EOS."""
        return [self.bos_id] * (bos and self.add_bos) + self._encode(text) + [self.eos_id] * eos

    def decode(self, ids) -> str:
        return self._decode(list(ids))

    def render_chat(self, messages, add_generation_prompt=True) -> str:
        """The chat template rendered as transformers' apply_chat_template renders it: a sandboxed jinja2
        environment with trim_blocks and lstrip_blocks and the loopcontrols extension; raise_exception,
        strftime_now, a tojson that keeps non-ASCII characters; the special tokens' strings (bos_token,
        eos_token, ...) as variables; message keys whose value is None dropped."""
        if self.chat_template is None:
            raise ValueError(f"{self.path}: no chat template (tokenizer_config.json's chat_template or chat_template.jinja)")
        import datetime

        import jinja2
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        class Generation(jinja2.ext.Extension):
            """{% generation %}...{% endgeneration %} marks the assistant's text for transformers' training masks;
            here it renders its body, as there."""
            tags = {"generation"}

            def parse(self, parser):
                lineno = next(parser.stream).lineno
                body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
                return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

            def _body(self, caller):
                return caller()

        def raise_exception(message):
            raise jinja2.exceptions.TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, jinja2.ext.loopcontrols])
        env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
        messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
        try:
            return env.from_string(self.chat_template).render(messages=messages, tools=None, documents=None,
                                                              add_generation_prompt=add_generation_prompt, **self.special_tokens)
        except jinja2.exceptions.TemplateError as e:  # a syntax error, or the template's own raise_exception
            raise ValueError(f"{self.path}: chat template: {one_line(e)}") from None

    def apply_chat_template(self, messages, add_generation_prompt=True) -> list:
        """Token ids of the rendered chat, as transformers' apply_chat_template(messages, add_generation_prompt)
        gives them: the template writes the special tokens itself, so none are added."""
        return self.encode(self.render_chat(messages, add_generation_prompt), bos=False)
