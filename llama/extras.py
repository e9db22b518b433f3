"""The package's name on PyPI and its optional parts: which extra brings which packages, and
the one way a missing one is reported."""

import re

DISTRIBUTION = "llama2-inference"  # `pip install llama2-inference`; the import name is `llama`

# extra -> the packages it installs (pyproject.toml's optional-dependencies say the same; a test checks)
EXTRAS = {
    "hf": ("safetensors",),
    # httptools and uvloop: uvicorn's C parser and event loop, which it takes when present
    "server": ("fastapi>=0.165", "uvicorn>=0.30", "httptools>=0.6", "uvloop>=0.19; sys_platform != 'win32'"),
}


def install_hint(extra: str) -> str:
    """How to install `extra`, from PyPI or in a clone."""
    return f"pip install '{DISTRIBUTION}[{extra}]' (in a clone: pip install -e '.[{extra}]')"


def needs(what: str, extra: str) -> str:
    """The message for a missing optional package: `what` needs `extra`'s packages."""
    names = [re.split(r"[<>=!~ ]", p)[0] for p in EXTRAS[extra]]
    return f"{what} needs {' and '.join(names)}, from the '{extra}' extra: {install_hint(extra)}"
