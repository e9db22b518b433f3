"""The command lines: flags checked before anything loads, one line of help per flag, and
messages in the language of flags (the API's own messages keep the API's names)."""

import os
import pty
import select
import subprocess
import sys

import pytest

import example_chat_completion
import example_text_completion
from llama import Llama, memory
from llama import checkpoint as ck
from llama.cli import FLAGS, Parser
from llama.tokenizer import Tokenizer
from llama.tools import chat, check, convert, quantize, random_checkpoint, reshard
from tests.conftest import FIXTURES, REPO, TOKENIZER
from tests.helpers import cli

# entry point name -> (module, the function its __main__ runs)
ENTRY_POINTS = {
    "example_text_completion": (example_text_completion, example_text_completion.cli),
    "example_chat_completion": (example_chat_completion, example_chat_completion.cli),
    "chat": (chat, chat.main),
    "check": (check, check.main),
    "convert": (convert, convert.main),
    "quantize": (quantize, quantize.main),
    "reshard": (reshard, reshard.main),
    "random_checkpoint": (random_checkpoint, random_checkpoint.main),
}
MODEL_ENTRY_POINTS = ("example_text_completion", "example_chat_completion", "chat")


@pytest.fixture
def nothing_loads(monkeypatch):
    """Fails the test if a model, tokenizer or checkpoint is opened."""

    def refuse(*a, **k):
        raise AssertionError("loaded something before the flags were checked")

    monkeypatch.setattr(Llama, "build", refuse)
    monkeypatch.setattr(ck, "open_checkpoint", refuse)
    monkeypatch.setattr(Tokenizer, "__init__", refuse)


@pytest.mark.parametrize("name", MODEL_ENTRY_POINTS)
def test_misspelled_flags_fail_before_loading_naming_the_closest(name, ckpts, nothing_loads, capsys):
    _, entry = ENTRY_POINTS[name]
    code = cli(entry, "--ckpt_dir", ckpts["gqa1"], "--tokenizer_path", TOKENIZER, "--promt", "hi",
               "--max_seq_length", "256")
    err = capsys.readouterr().err
    assert code == 2
    assert "unknown flag --max_seq_length (did you mean --max_seq_len?)" in err
    if name != "chat":  # the chat takes no --prompt; the closest it has is another flag
        assert "unknown flag --promt (did you mean --prompt?)" in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("name, argv, said", [
    ("check", ["FOLDER", "--tokenizer-path", "T"], "unknown flag --tokenizer-path (did you mean --tokenizer_path?)"),
    ("reshard", ["--ckpt_dir", "X", "--out", "Y", "--shard", "2"], "unknown flag --shard (did you mean --shards?)"),
    ("quantize", ["--ckpt_dir", "X", "--out", "Y", "--mode", "int4", "--groupsize", "32"],
     "unknown flag --groupsize (did you mean --group_size?)"),
    ("convert", ["--to", "hf", "--ckpt_dir", "X", "--output", "Y"], "unknown flag --output"),
    ("random_checkpoint", ["OUT", "--n_layer", "1"], "unknown flag --n_layer (did you mean --n_layers?)"),
])
def test_tools_refuse_unknown_flags_before_doing_anything(name, argv, said, nothing_loads, capsys, tmp_path):
    _, entry = ENTRY_POINTS[name]
    argv = [str(tmp_path / a) if a in ("FOLDER", "X", "Y", "OUT") else a for a in argv]
    assert cli(entry, *argv) == 2
    assert said in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # nothing written


@pytest.mark.parametrize("name", ENTRY_POINTS)
def test_help_lists_every_flag_with_one_line(name, capsys):
    module, entry = ENTRY_POINTS[name]
    p = module.parser()
    for action in p._actions:
        label = "/".join(action.option_strings) or action.dest
        assert action.help, f"{name}: {label} has no help"
        assert "\n" not in action.help and len(action.help) <= 110, f"{name}: {label}: {action.help!r}"
        assert action.help.count("(default:") <= 1, f"{name}: {label}: {action.help!r}"
    assert cli(entry, "--help") == 0
    out = capsys.readouterr().out
    for action in p._actions:
        for opt in action.option_strings:
            assert opt in out
    for odd in ("Optional[", "typing.", "<class", "<function", "NoneType", "(default: None)", "==SUPPRESS=="):
        assert odd not in out, f"{name} --help shows {odd!r}"


def test_shared_flags_have_the_same_help_everywhere():
    for name in MODEL_ENTRY_POINTS:
        p = ENTRY_POINTS[name][0].parser()
        for action in p._actions:
            flag = action.dest
            if flag in FLAGS and not (name == "chat" and flag == "seed"):  # the chat's own seed default
                assert action.help.startswith(FLAGS[flag]["help"]), (name, flag, action.help)


def test_defaults_are_said_once_and_truly():
    p = example_text_completion.parser()
    helps = {a.dest: a.help for a in p._actions}
    assert helps["max_gen_len"].endswith("(default: 64)")  # the example's own default, not the shared one's
    assert helps["max_seq_len"].endswith("(default: 128)")
    assert helps["temperature"].endswith("(default: 0.6)")
    assert helps["dtype"].endswith("(default: bfloat16 on CUDA, float32 on CPU)")
    assert "(default" not in helps["ckpt_dir"]  # required
    p = example_chat_completion.parser()
    assert {a.dest: a.help for a in p._actions}["max_gen_len"].endswith("(default: up to max_seq_len)")


def test_chat_help_lists_its_commands(capsys):
    assert cli(chat.main, "--help") == 0
    out = capsys.readouterr().out
    for command in ("/reset", "/system TEXT", "/exit", "Ctrl-C", "Ctrl-D"):
        assert command in out


def test_version_flag(capsys):
    from llama import __version__
    from llama.extras import DISTRIBUTION

    assert cli(check.main, "--version") == 0
    assert capsys.readouterr().out.strip() == f"{DISTRIBUTION} {__version__}"


def test_help_on_a_terminal_opens_no_pager(tmp_path):
    """fire's help opened a pager on a terminal; argparse prints. PAGER here would leave a mark."""
    marker = tmp_path / "paged"
    env = dict(os.environ, PAGER=f"touch {marker}; cat >/dev/null", MANPAGER=f"touch {marker}", LESS="", COLUMNS="100")
    pid, fd = pty.fork()
    if pid == 0:  # the child, on the terminal
        os.chdir(REPO)
        os.execve(sys.executable, [sys.executable, "example_text_completion.py", "--help"], env)
    out = b""
    while True:
        ready, _, _ = select.select([fd], [], [], 60)
        if not ready:
            break
        try:
            chunk = os.read(fd, 4096)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    _, status = os.waitpid(pid, 0)
    text = out.decode(errors="replace")
    assert os.waitstatus_to_exitcode(status) == 0
    assert "--max_gen_len N" in text and "--tokenizer_path FILE" in text
    assert not marker.exists()


def test_to_flags_rewrites_api_names():
    p = example_text_completion.parser()
    assert p.to_flags("longer than max_seq_len=64: raise max_seq_len.") == "longer than --max_seq_len 64: raise --max_seq_len."
    assert p.to_flags("It would fit with: quantize='int4'; or max_batch_size=3 with max_seq_len=128.") == (
        "It would fit with: --quantize int4; or --max_batch_size 3 with --max_seq_len 128.")
    assert p.to_flags("temperature must be >= 0") == "--temperature must be >= 0"
    assert p.to_flags("use device='cpu'") == "use --device cpu"
    # paths, names that are not flags and flags already written stay as they are
    assert p.to_flags("'/data/max_seq_len' and max_seq_len.json") == "'/data/max_seq_len' and max_seq_len.json"
    assert p.to_flags("model_parallel_size=2 needs --max_seq_len 4") == "model_parallel_size=2 needs --max_seq_len 4"
    # only this parser's flags: check has no --max_seq_len
    assert check.parser().to_flags("max_seq_len=64") == "max_seq_len=64"


def test_memory_hints_speak_api_in_the_api_and_flags_on_the_command_line(ckpts, build, monkeypatch, capsys):
    monkeypatch.setattr(memory, "free_bytes", lambda device: 40 * 1024**2)
    with pytest.raises(MemoryError) as api:
        build(ckpts["gqa1"], max_seq_len=4096, max_batch_size=64)
    assert "It would fit with: max_seq_len=" in str(api.value) and "--" not in str(api.value).split("(torchrun")[0]
    code = cli(example_text_completion.cli, "--ckpt_dir", ckpts["gqa1"], "--tokenizer_path", TOKENIZER,
               "--max_seq_len", "4096", "--max_batch_size", "64", "--device", "cpu")
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: the model needs")
    assert "It would fit with: --max_seq_len " in err and "max_seq_len=" not in err and "max_batch_size=" not in err


def test_build_errors_speak_flags_on_the_command_line(ckpts, capsys):
    with pytest.raises(ValueError, match="^max_batch_size must be a positive int"):
        Llama.build(ckpts["gqa1"], TOKENIZER, 64, 0)
    assert cli(example_chat_completion.cli, "--ckpt_dir", ckpts["gqa1"], "--tokenizer_path", TOKENIZER,
               "--max_batch_size", "0") == 2
    assert capsys.readouterr().err == "error: --max_batch_size must be a positive int, got 0\n"


def test_a_folder_as_tokenizer_is_named_a_folder(ckpts, capsys):
    with pytest.raises(ValueError, match="is a folder, not a tokenizer.model file: pass '.*fixtures/tokenizer.model'"):
        Tokenizer(str(FIXTURES))
    with pytest.raises(ValueError, match="is a folder, not a tokenizer.model file: pass the tokenizer.model file"):
        Tokenizer(ckpts["gqa1"])
    assert cli(example_text_completion.cli, "--ckpt_dir", ckpts["gqa1"], "--tokenizer_path", str(FIXTURES)) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --tokenizer_path {str(FIXTURES)!r} is a folder, not a tokenizer.model file")
    assert "not found" not in err
    assert check.main([ckpts["gqa1"], "--tokenizer_path", str(FIXTURES)]) == 1
    assert "- --tokenizer_path" in capsys.readouterr().err


def test_convert_without_safetensors_names_the_extra(ckpts, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "safetensors", None)  # import fails as if not installed
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    assert cli(convert.main, "--to", "hf", "--ckpt_dir", ckpts["gqa1"], "--out", str(tmp_path / "hf")) == 2
    err = capsys.readouterr().err
    assert err == ("error: writing Hugging Face files needs safetensors, from the 'hf' extra: "
                   "pip install 'llama2-inference[hf]' (in a clone: pip install -e '.[hf]')\n")
    assert not (tmp_path / "hf").exists()


def test_api_names_stay_in_library_messages():
    """Library code raises in API terms; flags appear only in the command-line layers (the
    tools, the server's __main__, and torchrun's --nproc_per_node, the same in both)."""
    offenders = []
    for path in sorted((REPO / "llama").rglob("*.py")):
        if path.parent.name == "tools" or path.name in ("cli.py", "torchrun.py", "commands.py", "__main__.py"):
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            for flag in ("--ckpt_dir", "--out", "--max_seq_len", "--max_batch_size", "--quantize", "--tokenizer_path",
                         "--device", "--dtype"):
                if flag in code:
                    offenders.append(f"{path.relative_to(REPO)}:{i}: {flag}")
    assert offenders == []


@pytest.mark.slow
def test_a_misspelled_flag_fails_in_a_second_as_a_script(ckpts):
    res = subprocess.run([sys.executable, "example_chat_completion.py", "--ckpt_dir", ckpts["gqa1"], "--tokenizer_path",
                          TOKENIZER, "--promt", "hi"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr == ("example_chat_completion.py: error: unknown flag --promt (did you mean --prompt?) "
                          "(see example_chat_completion.py --help)\n")
