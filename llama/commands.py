"""The console commands `pip install` puts on PATH (pyproject.toml's [project.scripts]): each
runs a tool's `main` as `python -m llama.tools.NAME` does, through `distributed.run_main`,
so a user error prints as one line and the exit status says how it ended."""

import importlib

from llama import torchrun as _launcher
from llama.distributed import run_main
from llama.extras import needs
from llama.tools import chat as _chat
from llama.tools import check as _check
from llama.tools import convert as _convert
from llama.tools import quantize as _quantize
from llama.tools import random_checkpoint as _random_checkpoint
from llama.tools import reshard as _reshard


def chat() -> None:
    run_main(_chat.main)


def check() -> None:
    run_main(_check.main)


def convert() -> None:
    run_main(_convert.main)


def quantize_ckpt() -> None:
    run_main(_quantize.main)


def reshard() -> None:
    run_main(_reshard.main)


def random_checkpoint() -> None:
    run_main(_random_checkpoint.main)


def server() -> None:
    """`llama.server`'s main; its web packages come with the 'server' extra, so it is imported
    only here."""

    def entry():
        try:
            module = importlib.import_module("llama.server")
        except ModuleNotFoundError as e:
            if e.name in ("fastapi", "uvicorn", "pydantic", "starlette"):
                raise ValueError(needs("llama-server", "server")) from None
            if e.name == "llama.server":
                raise ValueError("this version of the package has no server (llama.server)") from None
            raise
        return module.main()

    run_main(entry)


def torchrun() -> None:
    raise SystemExit(_launcher.main())
