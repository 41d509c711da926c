"""
What every command line of this project shares, so that each script says it once:

  * a user's mistake is one `error: ...` line on stderr and exit status 2, never a traceback, also under
    torchrun (`entry`, around each script's main(argv));
  * `--help` shows every default, which flags are required, and example commands (`Parser`);
  * what a command writes follows one policy: longlora/output.py.

    @entry
    def main(argv=None) -> int:
        p = Parser(description="...", examples=["python x.py --in a --out b"])
        ...
"""

import argparse
import functools
import hashlib
import json
import math
import os
import re
import sys
import tempfile
import time

import torch


class UsageError(Exception):
    """A user's mistake found by a check of the arguments (the same on every rank under torchrun)."""


# What a user's mistake raises, besides UsageError: the readers of checkpoints, tokenizers and data raise
# ValueError (weights.CheckpointError is one) with a message naming the file; paths that do not exist or cannot
# be written raise OSError (FileNotFoundError, NotADirectoryError, PermissionError, ...). Anything else is a
# bug, and keeps its traceback.
USER_ERRORS = (UsageError, ValueError, OSError)


def one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text or type(e).__name__


def first_on_this_machine(message: str) -> bool:
    """Whether this rank is the first of its machine to report `message` in this launch of torchrun: each one
    tries to create a file named after the launch (torchrun's agent, the parent of every local rank, and its
    restart count) and the message; only one can."""
    launch = f"{os.getppid()} {os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')} {message}"
    path = os.path.join(tempfile.gettempdir(), f"longlora-error-{hashlib.sha1(launch.encode()).hexdigest()[:20]}")
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    except OSError:  # no temporary folder to agree in: print
        pass
    return True


def report(e: BaseException):
    """Print the error once. Under torchrun, an error that every rank meets (a wrong flag, an unreadable tokenizer)
    is printed once per machine, by the first rank there to meet it; any other error by the rank that met it.
    Errors other than argument errors name that rank.

    torchrun stops every rank as soon as one exits, and then prints its own summary of the failure. So each
    rank also writes the line into torchrun's error file (TORCHELASTIC_ERROR_FILE), which that summary shows
    as the "Root Cause"; and a rank that prints nothing waits a moment, so that the one that prints is not
    stopped before it has."""
    rank = os.environ.get("RANK")
    line = f"error: {one_line(e)}"
    if rank is None or "WORLD_SIZE" not in os.environ:
        print(line, file=sys.stderr)
        return
    prints = first_on_this_machine(one_line(e))
    if not isinstance(e, UsageError):
        line = f"error: rank {rank}: {one_line(e)}"
    if prints:
        print(line, file=sys.stderr, flush=True)
    if os.environ.get("TORCHELASTIC_ERROR_FILE"):  # the format torch.distributed.elastic's @record writes
        with open(os.environ["TORCHELASTIC_ERROR_FILE"], "w") as f:
            json.dump({"message": {"message": line, "extraInfo": {"py_callstack": line, "timestamp": str(int(time.time()))}}}, f)
    if not prints:
        time.sleep(2)


def entry(main):
    """Decorate a script's main(argv) -> int: a user's mistake prints one `error:` line and returns 2;
    Ctrl-C prints one line and returns 130 (the shell's code for SIGINT)."""

    @functools.wraps(main)
    def run(argv=None):
        try:
            return main(argv)
        except USER_ERRORS as e:
            report(e)
            return 2
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130

    return run


# ----------------------------------------------------------------------------------------------------
# Arguments


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every flag's help ends with its default (unless the text already states it) and says when it is required."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)
        if (not any(default is v for v in (None, False, argparse.SUPPRESS)) and action.option_strings  # (0 == False)
                and not all(str(v) in text for v in (default if isinstance(default, (list, tuple)) else [default]))):
            text += f" (default: {shown.replace('%', '%%')})"
        if action.required and action.option_strings:
            text += " (required)"
        return text


class Parser(argparse.ArgumentParser):
    """argparse with HelpFormatter, no abbreviated flags, example commands below the flags, and a mistake
    raised as UsageError (one line; `entry` prints it) instead of a usage dump and exit."""

    def __init__(self, *args, examples=(), **kw):
        spec = getattr(sys.modules["__main__"], "__spec__", None)
        if spec is not None and spec.name.startswith("longlora."):  # `python -m longlora.eval`: say so in the usage line
            kw.setdefault("prog", f"python -m {spec.name}")
        kw.setdefault("formatter_class", HelpFormatter)
        kw.setdefault("allow_abbrev", False)
        if examples:
            kw.setdefault("epilog", "examples:\n" + "\n".join(f"  {e}" for e in examples))
        super().__init__(*args, **kw)

    def error(self, message):
        # "argument --steps: must be an integer >= 1, got '0'" (a type of this file) reads as "--steps must be ..."
        raise UsageError(re.sub(r"^argument (\S+): (must )", r"\1 \2", message))


# The type of every numeric flag, so that each is checked once, as it is parsed, before any work: nan, inf and
# out-of-range values are refused with the flag's name. (A default is not parsed: it is right by construction.)

MAX_CTX = 2**24  # the longest context (and prompt, window, --ctx) any flag takes: 16M tokens, 4096 x a factor of 4096


def _bounds(lo, hi, lo_open=False, hi_open=False):
    lo, hi = (f"{v:g}" if isinstance(v, float) else v for v in (lo, hi))
    if lo is not None and hi is not None:
        return f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    return f"{'>' if lo_open else '>='} {lo}" if lo is not None else f"{'<' if hi_open else '<='} {hi}"


def integer(lo=None, hi=None):
    """argparse type: an integer in [lo, hi] (either bound may be None)."""
    def parse(s):
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {s!r}") from None
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            raise argparse.ArgumentTypeError(f"must be an integer {_bounds(lo, hi)}, got {s}")
        return v

    return parse


def number(lo=None, hi=None, lo_open=False, hi_open=False):
    """argparse type: a finite number in [lo, hi], (lo, hi], [lo, hi) ... (nan and inf are refused)."""
    def parse(s):
        try:
            v = float(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number, got {s!r}") from None
        if not (math.isfinite(v) and (lo is None or v > lo or (v == lo and not lo_open))
                and (hi is None or v < hi or (v == hi and not hi_open))):
            raise argparse.ArgumentTypeError(f"must be a finite number {_bounds(lo, hi, lo_open, hi_open)}, got {s}")
        return v

    return parse


# ----------------------------------------------------------------------------------------------------
# Inputs of sample.py and eval


def read_prompt(arg: str) -> str:
    """The prompt text from `-` (stdin), a file, or the argument itself. Raises ValueError/FileNotFoundError."""
    if arg == "-":
        data, where = sys.stdin.buffer.read(), "stdin"
    elif os.path.isdir(arg):
        raise ValueError(f"prompt {arg} is a directory, not a text file")
    elif os.path.isfile(arg):
        with open(arg, "rb") as f:
            data, where = f.read(), f"prompt file {arg}"
    elif re.fullmatch(r"\S*(/|\\)\S*|\S+\.[A-Za-z0-9]{1,8}", arg):  # one word with a slash or an extension
        raise FileNotFoundError(f"prompt file {arg}: no such file (to use it as text, add a space)")
    else:
        if not arg.strip():
            raise ValueError("the prompt is empty")
        return arg
    if b"\0" in data:
        raise ValueError(f"{where} looks binary (it contains NUL bytes), expected UTF-8 text")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{where} is not UTF-8 text (invalid byte 0x{data[e.start]:02x} at offset {e.start})") from None
    if not text.strip():
        raise ValueError(f"{where} is empty")
    return text


def size_or_ratio(s: str):
    """argparse type: "256" -> 256 tokens, "0.1" -> 10% of the prompt."""
    try:
        value = float(s) if any(c in s.lower() for c in ".ena") else int(s)  # (nan and inf are floats)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a token count (256) or a ratio of the prompt (0.1), got {s!r}")
    if not 0 <= value <= (1 if isinstance(value, float) else MAX_CTX):  # (nan fails)
        raise argparse.ArgumentTypeError(f"must be a count in [0, {MAX_CTX}] or a ratio in [0, 1], got {s!r}")
    return value


def device_list(s: str) -> list:
    """argparse type of --devices: two or more devices, comma-separated (each is checked by resolve_device_dtype)."""
    devices = [d.strip() for d in s.split(",")]
    if len(devices) < 2 or not all(devices):
        raise argparse.ArgumentTypeError(f"must be two or more comma-separated devices (cuda:0,cuda:1), got {s!r}")
    return devices


def check_device(device: str, flag: str):
    """cpu, cuda, cuda:N (a GPU that exists) or mps (where available); anything else is refused, by name."""
    m = re.fullmatch(r"cuda(?::(\d+))?", device)
    if m and not torch.cuda.is_available():
        raise UsageError(f"{flag} {device} but CUDA is not available")
    if m and m.group(1) is not None and int(m.group(1)) >= torch.cuda.device_count():
        raise UsageError(f"{flag} {device}: this machine has {torch.cuda.device_count()} CUDA device(s), cuda:0 .. "
                         f"cuda:{torch.cuda.device_count() - 1}")
    if device == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"{flag} mps but MPS is not available")
    if not (m or device in ("cpu", "mps")):
        raise UsageError(f"{flag} {device}: expected cpu, cuda, cuda:N or mps")


def resolve_device_dtype(device, dtype):
    """(device, torch dtype) of --device (a string) or --devices (a list, a model split over them: longlora/devices.py)
    and --dtype; every device is checked (check_device) before a model is loaded."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    devices = device if isinstance(device, list) else [device]
    for d in devices:
        check_device(d, "--devices" if isinstance(device, list) else "--device")
    if dtype in (None, "auto"):  # bf16 halves memory on GPUs; CPUs are fastest and exact in fp32
        dtype = "bfloat16" if all(d.startswith("cuda") for d in devices) else "float32"
    return device, getattr(torch, dtype)
