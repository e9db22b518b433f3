"""README.md's first screen: install, test, a tiny check, in that order, and the check's
commands run as written, in seconds."""

import os
import re
import shlex
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO, free_port

README = (REPO / "README.md").read_text()
# console command -> the module it runs (the commands' own wiring is tests/test_packaging.py's)
MODULES = {"llama-random-checkpoint": "llama.tools.random_checkpoint", "llama-check": "llama.tools.check",
           "llama-torchrun": "llama.torchrun", "llama-chat": "llama.tools.chat"}


def section(title: str) -> str:
    start = README.index(f"## {title}")
    return README[start:README.index("\n## ", start + 1)]


def commands(text: str):
    """The shell commands of the first bash block in `text`, continuation lines joined."""
    block = re.search(r"```bash\n(.*?)```", text, re.S).group(1)
    return [c.strip() for c in block.replace("\\\n", " ").splitlines() if c.strip() and not c.startswith("#")]


def test_first_screen_is_install_test_check():
    headings = re.findall(r"^## (.+)$", README, re.M)
    assert headings[:3] == ["Install", "Test", "Check an install before the weights arrive"]
    assert README.index("## Check an install") < 3000  # on the first screen, give or take
    install = commands(section("Install"))
    assert install[0].startswith("python3 -m venv ")
    assert install[1].startswith("pip install torch --index-url https://download.pytorch.org/whl/cpu")
    assert install[2] == "pip install -e '.[test]'"
    assert "CUDA" in section("Install")


def test_ci_runs_readmes_install_and_test_commands():
    ci = (REPO / ".ci" / "run").read_text()
    assert commands(section("Test")) == ["python -m pytest -q"]
    assert "python3 -m pip install -q -e '.[test]'" in ci and ci.rstrip().endswith("python3 -m pytest -q")


@pytest.mark.multiproc
@pytest.mark.slow
def test_the_check_runs_as_written_in_seconds(tmp_path):
    todo = commands(section("Check an install before the weights arrive"))
    assert len(todo) == 3
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env.update(CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(REPO))
    for line in todo:
        argv = [a.replace("/tmp/tiny", str(tmp_path / "tiny")) for a in shlex.split(line)]
        if "example_" in line:
            assert "--max_gen_len" in argv, line  # a short answer, not max_seq_len's worth
        if argv[0] == "python":
            argv[0] = sys.executable
        elif argv[0] in MODULES:
            argv[:1] = [sys.executable, "-m", MODULES[argv[0]]]
            if argv[2] == "llama.torchrun":  # a free port, not torchrun's default
                argv[3:3] = ["--master_addr", "127.0.0.1", "--master_port", str(free_port())]
        start = time.time()
        res = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
        took = time.time() - start
        assert res.returncode == 0, f"{line}\n{res.stderr[-3000:]}"
        assert "Traceback" not in res.stderr and "OMP_NUM_THREADS" not in res.stderr
        assert took < 90, f"{line} took {took:.0f} s"
        if "example_chat" in line:
            assert res.stdout.count("==================================") == 6
