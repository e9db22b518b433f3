"""The distribution: pyproject.toml's metadata, the console commands and what a build holds."""

import re
import ast
import importlib.metadata
import shutil
import subprocess
import sys
import tarfile
import zipfile

import pytest

import llama
from llama import commands, extras
from llama.tools import chat, check, convert, quantize, random_checkpoint, reshard
from tests.conftest import REPO

tomllib = pytest.importorskip("tomllib" if sys.version_info >= (3, 11) else "tomli")

COMMANDS = {
    "llama-chat": chat, "llama-check": check, "llama-convert": convert, "llama-quantize-ckpt": quantize,
    "llama-reshard": reshard, "llama-random-checkpoint": random_checkpoint,
}


@pytest.fixture(scope="module")
def project():
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


@pytest.fixture(scope="module")
def setuptools_config():
    return tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_name_version_and_license(project, setuptools_config):
    assert project["name"] == extras.DISTRIBUTION != "llama"
    assert set(project["dynamic"]) == {"version", "dependencies"}
    assert setuptools_config["dynamic"]["version"] == {"attr": "llama.__version__"}
    # setuptools reads the version without importing llama: it must stay a plain string literal
    tree = ast.parse((REPO / "llama" / "__init__.py").read_text())
    literal = [n.value.value for n in tree.body if isinstance(n, ast.Assign)
               and any(getattr(t, "id", None) == "__version__" for t in n.targets)]
    assert literal == [llama.__version__]
    assert project["license"] == "MIT" and (REPO / "LICENSE").read_text().startswith("MIT License")
    assert project["requires-python"] == ">=3.9" and project["description"] and project["urls"]


def test_dependencies_come_from_requirements_txt_which_the_sdist_holds(setuptools_config):
    assert setuptools_config["dynamic"]["dependencies"] == {"file": ["requirements.txt"]}
    manifest = (REPO / "MANIFEST.in").read_text().split()
    assert "requirements.txt" in manifest and "LICENSE" in manifest
    assert setuptools_config["package-data"]["llama"] == ["kernels/configs.json"]
    assert (REPO / "llama" / "kernels" / "configs.json").is_file()


def test_extras(project):
    optional = project["optional-dependencies"]
    for extra, packages in extras.EXTRAS.items():
        assert optional[extra] == list(packages)
    names = {re.split(r"[<>=!~ ]", p)[0] for p in optional["test"]}
    assert {"pytest", "safetensors", "transformers", "fastapi", "uvicorn", "httpx", "openai"} <= names


def test_console_commands_run_each_tool_through_run_main(project, monkeypatch):
    scripts = project["scripts"]
    assert set(scripts) == set(COMMANDS) | {"llama-server", "llama-torchrun"}
    assert not {"llama-quantize", "llama-cli"} & set(scripts)  # llama.cpp's names
    ran = []
    monkeypatch.setattr(commands, "run_main", ran.append)
    for name, tool in COMMANDS.items():
        module, func = scripts[name].split(":")
        assert module == "llama.commands"
        getattr(commands, func)()
        assert ran.pop() is tool.main, name
    assert scripts["llama-server"] == "llama.commands:server" and scripts["llama-torchrun"] == "llama.commands:torchrun"


def test_server_command_without_its_module_or_extra_says_so(monkeypatch):
    ran = []
    monkeypatch.setattr(commands, "run_main", ran.append)
    commands.server()
    entry = ran.pop()
    monkeypatch.setitem(sys.modules, "llama.server", None)  # as if the module were absent
    with pytest.raises(ValueError, match=r"no server \(llama.server\)"):
        entry()


@pytest.mark.slow
def test_the_wheel_and_sdist_hold_what_they_need(tmp_path):
    """Built with setuptools' own backend from a copy of the tracked files (no network)."""
    if int(importlib.metadata.version("setuptools").split(".")[0]) < 77:
        pytest.skip("pyproject.toml's license = 'MIT' needs setuptools >= 77 (pip's own builds fetch one)")
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], capture_output=True, text=True, cwd=REPO,
                           check=True).stdout.split()
    src = tmp_path / "src"
    for name in files:
        if not name.startswith("tests/") and (REPO / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, src / name)
    out = tmp_path / "dist"
    code = (f"from setuptools import build_meta as b; s = b.build_sdist({str(out)!r}); w = b.build_wheel({str(out)!r}); "
            "print('BUILT', s, w)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=src, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    sdist, wheel = res.stdout.split("BUILT")[-1].split()
    assert sdist == f"llama2_inference-{llama.__version__}.tar.gz"
    with tarfile.open(out / sdist) as t:
        names = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
    assert {"requirements.txt", "LICENSE", "README.md", "pyproject.toml", "llama/kernels/configs.json",
            "example_chat_completion.py"} <= names
    with zipfile.ZipFile(out / wheel) as z:
        names = set(z.namelist())
        dist_info = f"llama2_inference-{llama.__version__}.dist-info"
        entry_points = z.read(f"{dist_info}/entry_points.txt").decode()
        metadata = z.read(f"{dist_info}/METADATA").decode()
    assert "llama/kernels/configs.json" in names and "llama/tools/check.py" in names
    assert not any(n.startswith(("tests/", "benchmarks/")) for n in names)
    for name in [*COMMANDS, "llama-server", "llama-torchrun"]:
        assert f"{name} = llama.commands:" in entry_points
    assert "Requires-Dist: torch>=2.1" in metadata and 'Requires-Dist: safetensors; extra == "hf"' in metadata
