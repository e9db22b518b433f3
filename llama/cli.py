"""Command-line flags shared by the examples, the tools and the server: one definition, one
line of help each, the same on every entry point.

Flags read as the reference's `fire` scripts read them (`--max_seq_len 512`, `--fast False`,
`--stream` alone for True), but are all checked before anything loads: a misspelled flag
fails at once, naming the closest valid one.

The library's messages name settings as the Python API takes them (`max_seq_len=256`); a
command line speaks in flags (`--max_seq_len 256`): `Parser.speaking_flags` rewrites the
messages of errors raised under it with the parser's own flags.
"""

import argparse
import contextlib
import difflib
import os
import re
import sys
from typing import Dict, Iterable, Iterator, List, Optional

from llama import __version__
from llama.extras import DISTRIBUTION

TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def boolean(text: str) -> bool:
    low = str(text).lower()
    if low in TRUE:
        return True
    if low in FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}")


def optional_int(text: str) -> Optional[int]:
    return None if str(text).lower() == "none" else int(text)


def _bool_flag(help: str, default=None, unset: Optional[str] = None) -> dict:
    """A flag read as True alone (`--stream`) or with a value (`--fast False`)."""
    return dict(type=boolean, nargs="?", const=True, default=default, metavar="BOOL", unset=unset, help=help)


# name -> argparse keywords: help (one line), and `unset`: what a default of None means.
# `default` here is the usual one; entry points may override it.
FLAGS: Dict[str, dict] = {
    "ckpt_dir": dict(metavar="DIR", help="checkpoint folder: Meta's (params.json, consolidated.*.pth) or a Hugging Face "
                                         "Llama folder"),
    "tokenizer_path": dict(metavar="FILE", help="the SentencePiece tokenizer.model that came with the weights"),
    "max_seq_len": dict(type=int, metavar="N", help="longest prompt + answer, in tokens (the KV cache is sized for it)"),
    "max_batch_size": dict(type=int, metavar="N", help="most prompts decoded together"),
    "max_gen_len": dict(type=optional_int, default=None, metavar="N", unset="up to max_seq_len",
                        help="most new tokens per answer"),
    "temperature": dict(type=float, default=0.6, metavar="T", help="sampling temperature; 0 is greedy"),
    "top_p": dict(type=float, default=0.9, metavar="P", help="nucleus sampling: keep the most likely tokens up to this mass"),
    "top_k": dict(type=int, default=0, metavar="K", help="sample among the k most likely tokens only (0: off)"),
    "repetition_penalty": dict(type=float, default=1.0, metavar="X", help="> 1 discourages repeating tokens (1.0: off)"),
    "stop": dict(action="append", default=None, metavar="TEXT", help="end an answer before this text (repeatable)"),
    "seed": dict(type=optional_int, default=None, metavar="N", unset="the build seed", help="seed this run's sampling"),
    "dtype": dict(default=None, metavar="NAME", unset="bfloat16 on CUDA, float32 on CPU",
                  help="float32, bfloat16 or float16"),
    "device": dict(default=None, metavar="NAME", unset="cuda when present", help="cuda, cpu or mps"),
    "fast": _bool_flag("the fast decode path; False runs the reference's forward pass", unset="on with CUDA"),
    "compile": _bool_flag("accepted for compatibility; no effect"),
    "quantize": dict(default=None, choices=["int8", "int4"], unset="off", help="quantize the weights while loading"),
    "group_size": dict(type=int, default=128, metavar="N", help="int4: input columns per scale (a power of two)"),
    "threads": dict(type=int, default=None, metavar="N", unset="the physical cores, shared by the processes",
                    help="CPU threads per process"),
    "stream": _bool_flag("print answers as they are generated", default=False),
    "prompt": dict(default=None, metavar="TEXT", help="your own prompt instead of the built-in ones"),
    "system": dict(default=None, metavar="TEXT", help="a system prompt for the chat"),
    "dialogs": dict(default=None, metavar="FILE", help="a JSON file with a list of dialogs to answer"),
    "out": dict(metavar="DIR", help="the folder to write (new or empty)"),
}
MODEL_FLAGS = ("ckpt_dir", "tokenizer_path", "max_seq_len", "max_batch_size", "dtype", "device", "fast", "compile",
               "quantize", "group_size", "threads")
SAMPLING_FLAGS = ("max_gen_len", "temperature", "top_p", "top_k", "repetition_penalty", "stop", "seed")

# errors whose message `Parser.speaking_flags` rewrites (the kinds the library raises for bad input)
USER_ERRORS = (ValueError, TypeError, MemoryError, RuntimeError, FileNotFoundError)
# `name=value` in a message: the value quoted, or up to a space or punctuation
_VALUE = r"'[^']*'|\"[^\"]*\"|[^\s,;:()]+"


def _prog() -> str:
    """The command as typed: `python -m llama.tools.check` for a module, else the script's name
    (`example_chat_completion.py`, `llama-check`)."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    name = getattr(spec, "name", None) or ""
    if name.startswith("llama."):
        return f"python -m {name.removesuffix('.__main__')}"  # a package run with -m
    return os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "llama"


class Parser(argparse.ArgumentParser):
    """argparse with no abbreviations, no pager, one line of help per flag (its default said
    once), a suggestion for a mistyped flag, and errors in the language of flags."""

    def __init__(self, description: str, **kw):
        kw.setdefault("prog", _prog())
        super().__init__(description=description, allow_abbrev=False, **kw)
        self.add_argument("--version", action="version", version=f"{DISTRIBUTION} {__version__}",
                          help="print the version and exit")

    def add_argument(self, *names, unset: Optional[str] = None, **kw):
        """As argparse's, with the default appended to the help: `unset` says what a default of
        None means; defaults of False and flags that store a constant say nothing."""
        text, default = kw.get("help"), kw.get("default")
        if text and text != argparse.SUPPRESS and kw.get("action") not in ("store_true", "store_false", "version",
                                                                           "help"):
            note = unset if default is None else None if default is False or default == argparse.SUPPRESS else default
            if note is not None and not kw.get("required"):
                kw["help"] = f"{text} (default: {note})"
        return super().add_argument(*names, **kw)

    def add(self, names: Iterable[str], **overrides: dict) -> "Parser":
        """Adds the shared flags `names`; overrides[name] replaces keywords (e.g. a default)."""
        for name in names:
            kw = dict(FLAGS[name], **overrides.get(name, {}))
            if "default" in overrides.get(name, {}) and overrides[name]["default"] is not None:
                kw.pop("unset", None)
            self.add_argument(f"--{name}", **kw)
        return self

    def parse_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else list(args)
        if not any(a in ("-h", "--help", "--version") for a in args):
            self._refuse_unknown(args)
        return super().parse_args(args, namespace)

    def _refuse_unknown(self, args: List[str]) -> None:
        """Exits naming any unknown flag, checked before required ones: a misspelled required
        flag is named as misspelled, not as missing."""
        required = [a for a in self._actions if a.required]
        for a in required:
            a.required = False
        try:
            _, rest = self.parse_known_args(args)
        finally:
            for a in required:
                a.required = True
        if rest:
            self.error(self.unknown_message(rest))

    def error(self, message: str):
        """One line (no usage block), exit status 2."""
        self.exit(2, f"{self.prog}: error: {message}\n")

    def unknown_message(self, rest: List[str]) -> str:
        known = [opt for action in self._actions for opt in action.option_strings]
        parts = []
        after_flag = False
        for arg in rest:
            flag = arg.split("=", 1)[0]
            if not flag.startswith("-"):
                if not after_flag:  # not the value of an unknown flag
                    parts.append(f"unexpected argument {arg!r}")
                after_flag = False
                continue
            after_flag = "=" not in arg
            close = difflib.get_close_matches(flag, known, n=1, cutoff=0.6)
            parts.append(f"unknown flag {flag}" + (f" (did you mean {close[0]}?)" if close else ""))
        return "; ".join(parts) + f" (see {self.prog} --help)"

    def flag_names(self) -> List[str]:
        """This parser's flags that are also API names (`--max_seq_len` -> max_seq_len)."""
        names = {opt[2:] for action in self._actions for opt in action.option_strings if opt.startswith("--")}
        return sorted((n for n in names if n.isidentifier() and n != "version"), key=len, reverse=True)

    def to_flags(self, message: str) -> str:
        """`message` in this parser's flags: `max_seq_len=256` -> `--max_seq_len 256`,
        `quantize='int4'` -> `--quantize int4`; a flag name with an underscore (`max_seq_len`),
        and any flag name that starts the message (`temperature must ...`), gets its `--`."""
        names = self.flag_names()
        if not names:
            return message
        alt = "|".join(map(re.escape, names))

        def assignment(m: "re.Match") -> str:
            value = m.group(2)
            if value[:1] in "'\"" and value[1:-1] and not re.search(r"\s", value):
                value = value[1:-1]
            return f"--{m.group(1)} {value}"

        text = re.sub(rf"(?<![\w./-])({alt})=({_VALUE})", assignment, message)
        text = re.sub(rf"^({alt}) (?=must\b|is\b)", r"--\1 ", text)
        snake = "|".join(re.escape(n) for n in names if "_" in n)
        if snake:
            text = re.sub(rf"(?<![\w./'\"-])({snake})(?![\w/'\"=-]|\.\w)", r"--\1", text)
        return text

    @contextlib.contextmanager
    def speaking_flags(self) -> Iterator[None]:
        """Errors raised inside (a message as their one argument) are re-raised with the message
        in this parser's flags (`to_flags`)."""
        try:
            yield
        except USER_ERRORS as e:
            plain = len(e.args) == 1 and isinstance(e.args[0], str)  # not OSError(errno, strerror, ...)
            if plain:
                e.args = (self.to_flags(e.args[0]),)
            raise


def build_kwargs(a: argparse.Namespace) -> dict:
    """Llama.build's keyword arguments from parsed model flags."""
    return dict(max_seq_len=a.max_seq_len, max_batch_size=a.max_batch_size, dtype=a.dtype, device=a.device,
                fast=a.fast, compile=a.compile, quantize=a.quantize, group_size=a.group_size, threads=a.threads)


def sampling_kwargs(a: argparse.Namespace) -> dict:
    return dict(temperature=a.temperature, top_p=a.top_p, max_gen_len=a.max_gen_len, top_k=a.top_k,
                repetition_penalty=a.repetition_penalty, stop=a.stop, seed=a.seed)
