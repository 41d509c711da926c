"""
Data preparation: documents -> one memory-mapped token file, tokenized once; windows, SFT records, the
held-out split and the sample order. train.py trains on it, longlora/eval.py and demo.py evaluate on it.

    text files, folders, JSONL/JSON ({"text": ...})         JSON/JSONL records {instruction, input?, output}
        │ prepare_tokens: [BOS] text [EOS] per document         │ prepare_sft: [BOS] prompt answer [EOS] (llama2 | longalpaca | chat)
        ▼                                                       ▼
    tokens.bin (uint16 when the vocabulary fits, else uint32) + tokens.bin.json (+ tokens.bin.index.npy for SFT)
        │ PackedData: windows of ctx + 1 tokens                 │ SFTData: one example per row, right-padded
        ▼                                                       ▼
    (x, y, lengths) batches; split_heldout picks the held-out ones; sample_positions the order

  * Continued pre-training. Each non-empty document is tokenized once as [BOS] text [EOS] (BOS where the
    tokenizer puts one at a text's start, as LLaMA's does, EOS to mark its end) and the documents are concatenated in file
    order into one memory-mapped token file. Its JSON sidecar records the dtype, vocabulary size, tokenizer
    path and its files' SHA-256, document count, and the input files' sizes and modification times; the next run with
    the same inputs and tokenizer reuses the file (train.py --token-cache DIR shares it between runs;
    `python -m longlora.eval --tokens` reads it).
  * Packing. Window i is tokens[i*ctx : i*ctx + ctx + 1]: input = window[:-1], target = window[1:].
    Neighbouring windows share one token, so every token but the very first is a target exactly once. A
    window may span two documents; the EOS/BOS pair marks the border. LongLoRA's fine-tune.py does it
    differently (tokenize_fn, mapped over batches of 1000 documents): it joins each batch's texts with
    the EOS token, tokenizes that once (one BOS at its start: one BOS per 1000 documents), pads it with
    [PAD] (a token it adds, id 32000) to a multiple of ctx and cuts rows of ctx tokens, which do not
    overlap; the [PAD] positions get no loss (DataCollatorForLanguageModeling).
  * Held-out split: round(n * fraction) windows (train.py --heldout 0.01: every ~100th), spread evenly over
    the whole corpus (not the tail of the last file), deterministically.
  * SFT (train.py --sft): records {instruction, input?, output} in one of three prompt formats (sft_prompt):
    "llama2" (the default), LLaMA2-chat's user turn "[INST] instruction\n\ninput [/INST]", the format
    sample.py --chat prompts in for a model without a chat template, so a model tuned on it answers there;
    "longalpaca", the exact strings of LongLoRA's supervised-fine-tune.py, which LongAlpaca models were
    trained on (LLaMA2-chat's system prompt when there is an input, "[INST]instruction[/INST]" without);
    or "chat", the model's own chat template with the user turn "instruction\n\ninput", as sample.py --chat
    renders it for such a model. Prompt tokens get target -100.
    Each micro-batch is right-padded to a multiple of `multiple` (8, or train.py's --group-size); padded
    positions get target -100 and the model gets `lengths`, so padded keys are never attended.
  * SFT attention groups. LongLoRA's SFT pads a batch to its longest example (T tokens) and uses groups
    of T/4 if T is a multiple of 4096, else 8192 (longlora_sft_group_size): an example of 1000 tokens gets
    full attention, where T/4 would give it groups of 250. train.py uses this rule by default for --sft
    (--sft-group-size official), so a short example is trained as it is used; "quarter" is T/4 of the
    padded batch.
  * SFT loss weighting. train.py's loss is the mean over all answer tokens of the global batch (every
    micro-batch of every rank): an answer token weighs the same in any batch. LongLoRA's scripts use HF
    Trainer (transformers 4.34), whose loss is the mean over one micro-batch's answer tokens, averaged
    over the accumulation steps and the ranks: a token of a short answer weighs more.
  * Order: each epoch is a permutation drawn from (seed, epoch), so the data position is a function of the
    step alone and a resumed run reads exactly the batches the uninterrupted one would have.
"""

import functools
import hashlib
import json
import os
import tempfile

import numpy as np
import torch

from longlora.output import atomic_write, one_writer, write_text


# ----------------------------------------------------------------------------------------------------
# Text: documents -> one memory-mapped token file, tokenized once and reused


TOKENS_FORMAT = "longlora-tokens-1"  # bump when the layout of the token files changes


def source_files(paths):
    """The --data arguments as a list of files: a folder becomes its files (recursive, sorted, no hidden ones)."""
    files = []
    for p in paths:
        if os.path.isdir(p):
            for root, dirs, names in os.walk(p):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))  # also fixes the walk order
                files += [os.path.join(root, n) for n in sorted(names) if not n.startswith(".")]
        elif os.path.isfile(p):
            files.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such file or directory")
    if not files:
        raise ValueError(f"empty dataset: no files in {', '.join(paths)}")
    return files


def is_json(path):
    """A file of records: .json or .jsonl, in any case (DATA.JSONL too)."""
    return path.lower().endswith((".json", ".jsonl"))


def read_records(path):
    """(where, record) for each record of a .json (a list of objects) or .jsonl (one object per line) file;
    `where` names it for an error message: "file.jsonl:7" (its line) or "file.json: record 7" (from 1)."""
    try:
        with open(path, encoding="utf-8") as f:
            if path.lower().endswith(".jsonl"):
                for i, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            yield f"{path}:{i}", json.loads(line)
                        except json.JSONDecodeError as e:
                            raise ValueError(f"{path}:{i}: not a JSON line ({e.msg})") from None
            else:
                data = json.load(f)
                if not isinstance(data, list):
                    raise ValueError(f"{path}: expected a JSON list of records")
                for i, rec in enumerate(data, 1):
                    yield f"{path}: record {i}", rec
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text") from None


def read_documents(files):
    """Yield document strings: a .jsonl/.json file holds records with a `text` field; any other file is one document."""
    for path in files:
        if is_json(path):
            for where, rec in read_records(path):
                if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                    raise ValueError(f"{where}: needs an object with a string field 'text', got {describe(rec, 'text')}")
                yield rec["text"]
        else:
            try:
                with open(path, encoding="utf-8") as f:
                    yield f.read()
            except UnicodeDecodeError:
                raise ValueError(f"{path}: not UTF-8 text") from None


JSON_TYPES = {dict: "an object", list: "an array", str: "a string", int: "a number", float: "a number", bool: "a boolean",
              type(None): "null"}


def describe(rec, field):
    """What a record holds where a string was expected, for an error message."""
    if not isinstance(rec, dict) or field is None:
        return JSON_TYPES.get(type(rec), "a value")
    if field not in rec:
        return "no such field"
    return f"{JSON_TYPES.get(type(rec[field]), 'a value')} ({json.dumps(rec[field])[:40]})"


def token_dtype(vocab_size):
    """uint16 when every id fits (LLaMA's 32000 does), else uint32: the element type of a token file."""
    return np.uint16 if vocab_size <= 2**16 else np.uint32


def file_sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def data_key(files, tokenizer, kind):
    """What the token file depends on: the input files (path, size, modification time), the bytes of every
    tokenizer file (tokenizer.json and its configs: another BOS, EOS or chat template is another tokenization)
    and the kind of preparation. Equal keys mean the cached tokens can be reused."""
    stats = [[os.path.abspath(f), os.path.getsize(f), os.stat(f).st_mtime_ns] for f in files]  # lists: as JSON reads them back
    return dict(format=TOKENS_FORMAT, kind=kind, files=stats,
                tokenizer_sha256={name: file_sha256(path) for name, path in sorted(tokenizer.files.items())})


def _cached(out_path, key):
    """The sidecar of out_path if it was written for exactly this key (and the token file is whole)."""
    try:
        with open(out_path + ".json") as f:
            meta = json.load(f)
        whole = os.path.getsize(out_path) == meta["n_tokens"] * np.dtype(meta["dtype"]).itemsize
        return meta if meta["key"] == key and whole else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_tokens(out_path, dtype, sequences):
    """Stream lists of token ids into out_path, atomically (a temporary file, then a rename). Returns the count."""
    n_tokens = 0

    def write(tmp):
        nonlocal n_tokens
        with open(tmp, "wb") as f:
            for ids in sequences:
                np.asarray(ids, dtype=dtype).tofile(f)
                n_tokens += len(ids)

    atomic_write(out_path, write)
    return n_tokens


def _write_sidecar(out_path, key, tokenizer, dtype, n_tokens, **extra):
    """out_path + ".json": what the token file holds and what it was made from (written after the tokens)."""
    meta = dict(key=key, dtype=np.dtype(dtype).name, vocab_size=tokenizer.vocab_size, tokenizer=tokenizer.path,
                bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id, n_tokens=n_tokens, **extra)
    text = json.dumps(meta, indent=1)
    write_text(out_path + ".json", text)


def open_tokens(path):
    """The token file written by prepare_tokens / prepare_sft, memory-mapped read-only (dtype from its sidecar)."""
    with open(path + ".json") as f:
        meta = json.load(f)
    return np.memmap(path, dtype=np.dtype(meta["dtype"]), mode="r")


def prepare_tokens(paths, tokenizer, out_path):
    """Tokenize text files / folders / JSONL (`text` field) once into out_path; reuse it when nothing changed.

    Each non-empty document becomes [BOS] ids [EOS] and the documents are concatenated in file order.
    Returns the tokens as a read-only np.memmap (uint16 when the vocabulary fits, else uint32); the sidecar
    out_path + ".json" records dtype, vocabulary size, tokenizer path and hash, and the document count.
    """
    files = source_files(paths)
    key = data_key(files, tokenizer, "text")
    with one_writer(out_path, "tokenizing"):  # a second run preparing the same file waits, then reuses it
        if _cached(out_path, key) is None:
            if tokenizer.eos_id < 0:
                raise ValueError(f"{tokenizer.path}: the tokenizer has no EOS token to join documents with")
            dtype, n_docs = token_dtype(tokenizer.vocab_size), 0

            def docs():
                nonlocal n_docs
                for text in read_documents(files):
                    if text.strip():  # an empty document would only add a BOS/EOS pair
                        n_docs += 1
                        yield tokenizer.encode(text, bos=True, eos=True)

            n_tokens = _write_tokens(out_path, dtype, docs())
            if n_docs == 0:
                os.remove(out_path)
                raise ValueError(f"empty dataset: no text in {', '.join(paths)}")
            _write_sidecar(out_path, key, tokenizer, dtype, n_tokens, n_docs=n_docs)
    return open_tokens(out_path)


def split_heldout(n, fraction):
    """(train ids, held-out ids) of n items: round(n * fraction) held out (at least 1 when fraction > 0 and
    n >= 2), spread evenly over the range, so the held-out text comes from all over the corpus."""
    n_held = 0 if fraction <= 0 or n < 2 else min(n - 1, max(1, round(n * fraction)))
    held = np.unique(((np.arange(n_held) + 0.5) * n / max(n_held, 1)).astype(np.int64))
    mask = np.zeros(n, dtype=bool)
    mask[held] = True
    return np.flatnonzero(~mask), np.flatnonzero(mask)


class PackedData:
    """Windows of ctx + 1 tokens over one token stream; `ids` selects which windows belong to this split.

        tokens   t0 t1 t2 ... t_ctx t_ctx+1 ... t_2ctx ...
        window 0 [t0 ............ t_ctx]                   input t0..t_ctx-1, target t1..t_ctx
        window 1                 [t_ctx ............ t_2ctx]
    """

    def __init__(self, tokens, ctx, ids=None):
        self.tokens, self.ctx = tokens, ctx
        self.n_windows = (len(tokens) - 1) // ctx
        self.ids = np.arange(self.n_windows) if ids is None else np.asarray(ids)

    def __len__(self):
        return len(self.ids)

    def batch(self, positions):
        """(x, y, lengths) for the given positions in this split: x, y (B, ctx) int64; lengths None (no padding)."""
        starts = self.ids[np.asarray(positions)] * self.ctx
        w = np.stack([self.tokens[s:s + self.ctx + 1] for s in starts]).astype(np.int64)  # (B, ctx + 1)
        w = torch.from_numpy(w)
        return w[:, :-1], w[:, 1:], None  # (B, ctx) each


# ----------------------------------------------------------------------------------------------------
# Supervised fine-tuning data: [INST] prompt [/INST] answer, loss on the answer only

# LongAlpaca's templates, from LongLoRA's supervised-fine-tune.py (PROMPT_DICT "prompt_input_llama2" for a
# record with a non-empty input, "prompt_llama2" without): LLaMA2-chat's default system prompt, then the
# instruction and the input; without input, no system prompt and no spaces inside the [INST] tags.
LONGALPACA_SYSTEM = (
    "[INST] <<SYS>>\n"
    "You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, while being safe.  "
    "Your answers should not include any harmful, unethical, racist, sexist, toxic, dangerous, or illegal content. "
    "Please ensure that your responses are socially unbiased and positive in nature.\n\n"
    "If a question does not make any sense, or is not factually coherent, explain why instead of answering something "
    "not correct. If you don't know the answer to a question, please don't share false information.\n"
    "<</SYS>> \n\n ")
SFT_TEMPLATES = ("llama2", "longalpaca", "chat")


def check_sft_record(where, rec):
    """An SFT record, checked: an object whose `instruction` and `output` are strings and whose `input`, if
    present, is a string or null (other fields are ignored). ValueError naming the record and the field."""
    if not isinstance(rec, dict):
        raise ValueError(f"{where}: must be an object {{instruction, input?, output}}, got {describe(rec, None)}")
    for field in ("instruction", "output", "input"):
        if not (isinstance(rec.get(field), str) or (field == "input" and rec.get(field) is None)):
            need = "a string or null" if field == "input" else "a string"
            raise ValueError(f"{where}: field '{field}' must be {need}, got {describe(rec, field)}")
    return rec


def sft_prompt(rec, template="llama2"):
    """The prompt text of a record {instruction, input?, output}.

      llama2      "[INST] instruction\n\ninput [/INST]" (or "[INST] instruction [/INST]"), fields stripped:
                  LLaMA2-chat's user turn, the format sample.py --chat prompts in
      longalpaca  supervised-fine-tune.py's exact strings, fields as they are (see LONGALPACA_SYSTEM)
      chat        the user turn "instruction\n\ninput" (or "instruction"), fields stripped: sft_example renders
                  the model's chat template around it
    """
    inp = rec.get("input") or ""
    if template == "longalpaca":
        return (LONGALPACA_SYSTEM + f"{rec['instruction']} \n{inp} [/INST]" if inp != ""
                else f"[INST]{rec['instruction']}[/INST]")
    instruction, inp = rec["instruction"].strip(), inp.strip()
    user = f"{instruction}\n\n{inp}" if inp else instruction
    return user if template == "chat" else f"[INST] {user} [/INST]"


def sft_example(tokenizer, rec, template="llama2"):
    """(ids, n_prompt): [BOS] prompt answer [EOS]; the first n_prompt ids are the prompt and get no loss.

    llama2: prompt and (stripped) answer are encoded separately, then concatenated, so that the border is
    exact. longalpaca, as supervised-fine-tune.py: prompt + answer encoded as one text (the answer follows
    "[/INST]" without a space), n_prompt = the length of the prompt encoded alone. chat: the prompt is the
    template rendered with the user turn and the generation prompt (sample.py --chat's prompt); the answer is
    what the template adds for the assistant's turn (the stripped answer and the template's end of turn,
    e.g. "<|im_end|>\n"), encoded separately: the template writes the special tokens, so none are added.
    """
    prompt = sft_prompt(rec, template)
    if template == "chat":
        messages = [{"role": "user", "content": prompt}]
        prompt_text = tokenizer.render_chat(messages, add_generation_prompt=True)
        whole = tokenizer.render_chat(messages + [{"role": "assistant", "content": rec["output"].strip()}], False)
        if not whole.startswith(prompt_text):
            raise ValueError(f"{tokenizer.path}: the chat template renders a conversation that does not start "
                             "with its prompt; use --sft-template llama2")
        prompt_ids = tokenizer.encode(prompt_text, bos=False)
        return prompt_ids + tokenizer.encode(whole[len(prompt_text):], bos=False), len(prompt_ids)
    prompt_ids = tokenizer.encode(prompt, bos=True, eos=False)
    if template == "longalpaca":
        return tokenizer.encode(prompt + rec["output"], bos=True, eos=True), len(prompt_ids)
    answer_ids = tokenizer.encode(rec["output"].strip(), bos=False, eos=True)
    return prompt_ids + answer_ids, len(prompt_ids)


def longlora_sft_group_size(n_tokens):
    """S²-Attn group size of LongLoRA's SFT (llama_attn_replace_sft.py, forward_flashattn) for a batch
    whose longest example has n_tokens tokens (it pads to the longest, truncated at the context): a
    quarter of it when it is a multiple of 4096, else 8192. A group larger than the batch is the whole
    row for half of the heads, and cuts the other half at 4096 (attention.py allows g > T for this): an
    example shorter than 4096 tokens gets full attention, one of exactly 4096 groups of 1024 (LongLoRA's
    llama_attn_replace_sft.py @d4eb344, lines 102-105)."""
    return n_tokens // 4 if n_tokens % 4096 == 0 else 8192


def prepare_sft(paths, tokenizer, out_path, template="llama2"):
    """Tokenize JSON/JSONL records {instruction, input?, output} once, in `template`'s format. Returns (tokens
    memmap, index) where index (N, 3) int64 holds each example's start, prompt length and total length."""
    files = source_files(paths)
    key = data_key(files, tokenizer, f"sft-{template}")
    index_path = out_path + ".index.npy"
    with one_writer(out_path, "tokenizing"):  # a second run preparing the same file waits, then reuses it
        if _cached(out_path, key) is None or not os.path.exists(index_path):
            if tokenizer.eos_id < 0:
                raise ValueError(f"{tokenizer.path}: the tokenizer has no EOS token to end answers with")
            if template == "chat" and tokenizer.chat_template is None:
                raise ValueError(f"{tokenizer.path}: no chat template (tokenizer_config.json's chat_template or "
                                 "chat_template.jinja) for --sft-template chat; use llama2")
            index = []

            def examples():
                start = 0
                for path in files:
                    for where, rec in read_records(path):
                        ids, n_prompt = sft_example(tokenizer, check_sft_record(where, rec), template)
                        index.append((start, n_prompt, len(ids)))
                        start += len(ids)
                        yield ids

            dtype = token_dtype(tokenizer.vocab_size)
            n_tokens = _write_tokens(out_path, dtype, examples())
            if not index:
                os.remove(out_path)
                raise ValueError(f"empty dataset: no records in {', '.join(paths)}")
            arr = np.asarray(index, dtype=np.int64).reshape(-1, 3)
            atomic_write(index_path, lambda f: np.save(open(f, "wb"), arr))
            _write_sidecar(out_path, key, tokenizer, dtype, n_tokens, n_examples=len(index))
    return open_tokens(out_path), np.load(index_path)


class SFTData:
    """Instruction examples, right-padded per micro-batch to a length the attention groups fit.

    An example longer than ctx + 1 tokens is cut to ctx + 1 (its answer loses its end). Targets are -100
    on the prompt and on the padding; `lengths` tells the model how many tokens of each row are real, so
    padded keys are never attended.
    """

    def __init__(self, tokens, index, ctx, multiple, pad_id, ids=None):
        self.tokens, self.index, self.ctx, self.multiple, self.pad_id = tokens, index, ctx, multiple, pad_id
        self.ids = np.arange(len(index)) if ids is None else np.asarray(ids)

    def __len__(self):
        return len(self.ids)

    def batch(self, positions):
        rows = [self.index[self.ids[p]] for p in np.asarray(positions)]
        seqs = [np.asarray(self.tokens[s:s + min(n, self.ctx + 1)], dtype=np.int64) for s, _, n in rows]
        longest = max(len(s) - 1 for s in seqs)
        T = min(self.ctx, -(-longest // self.multiple) * self.multiple)  # round up to a multiple; ctx is one
        x = torch.full((len(seqs), T), self.pad_id, dtype=torch.long)  # (B, T)
        y = torch.full((len(seqs), T), -100, dtype=torch.long)  # (B, T)
        lengths = torch.zeros(len(seqs), dtype=torch.long)
        for b, (seq, (_, n_prompt, _)) in enumerate(zip(seqs, rows)):
            n = len(seq) - 1
            x[b, :n] = torch.from_numpy(seq[:-1])
            y[b, :n] = torch.from_numpy(seq[1:])
            y[b, :n_prompt - 1] = -100  # target t is token t+1: prompt tokens 1 .. n_prompt-1 are not learned
            lengths[b] = n
        return x, y, lengths


# ----------------------------------------------------------------------------------------------------
# Sample order: a pure function of (seed, sample index), so a resumed run repeats it exactly


@functools.lru_cache(maxsize=4)  # a step draws from one or two epochs: keep their permutations
def epoch_order(n, seed, epoch):
    return np.random.default_rng([seed, epoch]).permutation(n)


def sample_positions(n, seed, first, count):
    """Positions (into a split of n items) of global samples first .. first+count-1: each epoch is a fresh
    permutation drawn from (seed, epoch)."""
    out = []
    for i in range(first, first + count):
        epoch, k = divmod(i, n)
        out.append(epoch_order(n, seed, epoch)[k])
    return np.asarray(out)


# ----------------------------------------------------------------------------------------------------
# Token files from elsewhere, and documents held in memory (longlora/eval.py, demo.py)


def read_token_file(path, vocab_size: int) -> np.ndarray:
    """A token file, memory-mapped: one written by prepare_tokens (its sidecar `path.json` names
    the dtype and the vocabulary), or a raw little-endian array of ids, uint16 when vocab_size <= 65536 else
    uint32 (LongLoRA's proof-pile test .bin is such a file)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"token file {path}: no such file")
    dtype = np.dtype(token_dtype(vocab_size)).newbyteorder("<")
    if os.path.isfile(path + ".json"):
        try:
            with open(path + ".json") as f:
                meta = json.load(f)
            dtype = np.dtype(meta["dtype"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}.json: cannot read the token file's description ({e})") from None
        if meta.get("vocab_size", vocab_size) != vocab_size:
            raise ValueError(f"token file {path} was made with a {meta['vocab_size']}-token vocabulary "
                             f"({meta.get('tokenizer')}), the model has {vocab_size}")
    size = os.path.getsize(path)
    if size == 0 or size % dtype.itemsize:
        raise ValueError(f"token file {path}: {size} bytes is not a whole number of {dtype.name} token ids")
    tokens = np.memmap(path, dtype=dtype, mode="r")
    top = int(tokens.max())
    if top >= vocab_size:
        raise ValueError(f"token file {path} holds id {top} but the vocabulary has {vocab_size} (another tokenizer?)")
    return tokens


def tokenize_documents(paths, tokenizer) -> np.ndarray:
    """Text files, folders or JSONL (`text` field), tokenized exactly as for training: each document
    becomes [BOS] text [EOS], concatenated in file order. Held in memory (a test set is small)."""
    with tempfile.TemporaryDirectory() as d:
        return np.array(prepare_tokens(paths, tokenizer, os.path.join(d, "tokens.bin")))
