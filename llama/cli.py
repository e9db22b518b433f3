"""Command-line flags shared by the examples, the tools and the server: one definition, one
line of help each, the same on every entry point.

Flags read as the reference's `fire` scripts read them (`--max_seq_len 512`, `--fast False`,
`--stream` alone for True), but are all checked before anything loads: a misspelled flag
fails at once, naming the closest valid one.
"""

import argparse
import difflib
import sys
from typing import Dict, Iterable, List, Optional

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


# name -> (argparse keywords, help). `default` here is the usual one; entry points may override.
FLAGS: Dict[str, dict] = {
    "ckpt_dir": dict(help="checkpoint folder: Meta's (params.json, consolidated.*.pth) or a Hugging Face Llama folder"),
    "tokenizer_path": dict(help="the SentencePiece tokenizer.model that came with the weights"),
    "max_seq_len": dict(type=int, help="longest prompt + answer, in tokens (the KV cache is sized for it)"),
    "max_batch_size": dict(type=int, help="most prompts decoded together"),
    "max_gen_len": dict(type=optional_int, default=None, help="most new tokens per answer (default: up to max_seq_len)"),
    "temperature": dict(type=float, default=0.6, help="sampling temperature; 0 is greedy"),
    "top_p": dict(type=float, default=0.9, help="nucleus sampling: keep the most likely tokens up to this mass"),
    "top_k": dict(type=int, default=0, help="sample among the k most likely tokens only (0: off)"),
    "repetition_penalty": dict(type=float, default=1.0, help="> 1 discourages repeating tokens (1.0: off)"),
    "stop": dict(action="append", default=None, metavar="TEXT", help="end an answer before this text (repeatable)"),
    "seed": dict(type=optional_int, default=None, help="seed this run's sampling (default: the build seed)"),
    "dtype": dict(default=None, help="float32, bfloat16 or float16 (default: bfloat16 on CUDA, float32 on CPU)"),
    "device": dict(default=None, help="cuda, cpu or mps (default: cuda when present)"),
    "fast": dict(type=boolean, nargs="?", const=True, default=None,
                 help="the fast decode path (default: on CUDA); False runs the reference's forward pass"),
    "compile": dict(type=boolean, nargs="?", const=True, default=None, help="accepted for compatibility; no effect"),
    "quantize": dict(default=None, choices=["int8", "int4"], help="quantize the weights while loading"),
    "group_size": dict(type=int, default=128, help="int4: input columns per scale (a power of two)"),
    "threads": dict(type=int, default=None, help="CPU threads per process (default: the physical cores)"),
    "stream": dict(type=boolean, nargs="?", const=True, default=False, help="print answers as they are generated"),
    "prompt": dict(default=None, help="your own prompt instead of the built-in ones"),
    "system": dict(default=None, help="a system prompt for the chat"),
    "dialogs": dict(default=None, metavar="FILE", help="a JSON file with a list of dialogs to answer"),
}
MODEL_FLAGS = ("ckpt_dir", "tokenizer_path", "max_seq_len", "max_batch_size", "dtype", "device", "fast", "compile",
               "quantize", "group_size", "threads")
SAMPLING_FLAGS = ("max_gen_len", "temperature", "top_p", "top_k", "repetition_penalty", "stop", "seed")


class Parser(argparse.ArgumentParser):
    """argparse with no abbreviations, no pager, and a suggestion for a mistyped flag."""

    def __init__(self, description: str, **kw):
        kw.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(description=description, allow_abbrev=False, **kw)

    def add(self, names: Iterable[str], **overrides: dict) -> "Parser":
        """Adds the shared flags `names`; overrides[name] replaces keywords (e.g. a default)."""
        for name in names:
            kw = dict(FLAGS[name], **overrides.get(name, {}))
            self.add_argument(f"--{name}", **kw)
        return self

    def parse_args(self, args=None, namespace=None):
        ns, rest = self.parse_known_args(args, namespace)
        if rest:
            self.error(self.unknown_message(rest))
        return ns

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


def build_kwargs(a: argparse.Namespace) -> dict:
    """Llama.build's keyword arguments from parsed model flags."""
    return dict(max_seq_len=a.max_seq_len, max_batch_size=a.max_batch_size, dtype=a.dtype, device=a.device,
                fast=a.fast, compile=a.compile, quantize=a.quantize, group_size=a.group_size, threads=a.threads)


def sampling_kwargs(a: argparse.Namespace) -> dict:
    return dict(temperature=a.temperature, top_p=a.top_p, max_gen_len=a.max_gen_len, top_k=a.top_k,
                repetition_penalty=a.repetition_penalty, stop=a.stop, seed=a.seed)

