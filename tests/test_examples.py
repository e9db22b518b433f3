"""The example scripts, end to end on a tiny random checkpoint, as a user runs them."""

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO, TOKENIZER, torchrun

SEP = "=================================="


def run_example(script, *args):
    cmd = [sys.executable, str(REPO / script), *args]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


def test_text_example(ckpts):
    out = run_example("example_text_completion.py", "--ckpt_dir", ckpts["gqa1"], "--tokenizer_path", TOKENIZER,
                      "--max_gen_len", "8")
    assert out.startswith("Loaded in ")
    assert out.count(SEP) == 4 and "I believe the meaning of life is\n> " in out
    assert "cheese =>\n> " in out


def test_chat_example_default_dialogs(ckpts):
    out = run_example("example_chat_completion.py", "--ckpt_dir", ckpts["gqa2"], "--tokenizer_path", TOKENIZER,
                      "--max_gen_len", "8", "--max_seq_len", "128")
    assert out.count(SEP) == 6
    assert "System: Always answer with Haiku\n\nUser: I am going to Paris, what should I see?\n\n> Assistant: " in out
    assert "> Assistant: Error: special tags are not allowed as part of the prompt." in out


def test_chat_example_own_prompt_and_dialog_file(ckpts, tmp_path):
    out = run_example("example_chat_completion.py", "--ckpt_dir", ckpts["gqa1"], "--tokenizer_path", TOKENIZER,
                      "--max_gen_len", "4", "--prompt", "北京在哪里？", "--system", "用中文回答")
    assert "System: 用中文回答\n\nUser: 北京在哪里？\n\n> Assistant: " in out and out.count(SEP) == 1
    dialogs = [[{"role": "user", "content": f"question {i}"}] for i in range(3)]
    path = tmp_path / "dialogs.json"
    path.write_text(json.dumps(dialogs))
    out = run_example("example_chat_completion.py", "--ckpt_dir", ckpts["gqa1"], "--tokenizer_path", TOKENIZER,
                      "--max_gen_len", "4", "--dialogs", str(path), "--max_batch_size", "2")
    assert out.count(SEP) == 3 and "User: question 2" in out


@pytest.mark.multiproc
def test_chat_example_under_torchrun(ckpts):
    res = torchrun(2, "example_chat_completion.py", "--ckpt_dir", ckpts["gqa2"], "--tokenizer_path", TOKENIZER,
                   "--max_gen_len", "4", "--prompt", "hi")
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count(SEP) == 1  # rank 1 is silent


@pytest.mark.slow  # command lines in subprocesses
def test_stream_flag_prints_the_same_text(ckpts):
    args = ["--ckpt_dir", ckpts["gqa1"], "--tokenizer_path", TOKENIZER, "--max_gen_len", "12", "--temperature", "0"]
    plain = run_example("example_text_completion.py", *args)
    streamed = run_example("example_text_completion.py", *args, "--stream")
    assert streamed.split("\n", 1)[1] == plain.split("\n", 1)[1]  # after "Loaded in ..."
    chat_args = args + ["--prompt", "你好，请介绍一下你自己"]
    plain = run_example("example_chat_completion.py", *chat_args)
    streamed = run_example("example_chat_completion.py", *chat_args, "--stream")
    assert streamed.split("\n", 1)[1] == plain.split("\n", 1)[1]


@pytest.mark.slow  # command lines in subprocesses
def test_sampling_flags(ckpts):
    args = ["--ckpt_dir", ckpts["gqa1"], "--tokenizer_path", TOKENIZER, "--max_gen_len", "12", "--prompt", "Hello"]
    a = run_example("example_text_completion.py", *args, "--seed", "3", "--top_k", "5")
    b = run_example("example_text_completion.py", *args, "--seed", "3", "--top_k", "5")
    c = run_example("example_text_completion.py", *args, "--seed", "3", "--top_k", "5", "--repetition_penalty", "2.0",
                    "--fast", "True")
    assert a.split("\n", 1)[1] == b.split("\n", 1)[1]
    assert "Hello\n> " in c


@pytest.mark.parametrize("script,args,message", [
    ("example_text_completion.py", ["--ckpt_dir", "no-such-dir"], "error: checkpoint directory 'no-such-dir' does not exist"),
    ("example_chat_completion.py", ["--ckpt_dir", "CKPT", "--max_batch_size", "0"], "error: --max_batch_size must be a positive int"),
    ("example_text_completion.py", ["--ckpt_dir", "CKPT", "--quantize", "int3"], "error: argument --quantize: invalid choice: 'int3'"),
])
def test_examples_report_user_errors_in_one_line(ckpts, script, args, message):
    args = [ckpts["gqa1"] if a == "CKPT" else a for a in args]
    res = subprocess.run([sys.executable, str(REPO / script), *args, "--tokenizer_path", TOKENIZER],
                         capture_output=True, text=True, timeout=300, cwd=REPO)
    assert res.returncode == 2
    assert message in res.stderr and "Traceback" not in res.stderr


def test_a_broken_dialogs_file_is_named_before_loading(tmp_path, monkeypatch, capsys):
    import example_chat_completion
    from llama import Llama
    from tests.helpers import cli

    monkeypatch.setattr(Llama, "build", lambda *a, **k: pytest.fail("built a model for a broken --dialogs file"))
    path = tmp_path / "my dialogs.json"
    path.write_text('[[{"role": "user", "content": "hi"}]')  # the closing bracket lost
    assert cli(example_chat_completion.cli, "--ckpt_dir", "X", "--tokenizer_path", TOKENIZER, "--dialogs", str(path)) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --dialogs {path} is not valid JSON (") and err.count("\n") == 1
    path.write_text('{"role": "user"}')
    assert cli(example_chat_completion.cli, "--ckpt_dir", "X", "--tokenizer_path", TOKENIZER, "--dialogs", str(path)) == 2
    assert f"--dialogs {path}: expected a JSON list of dialogs" in capsys.readouterr().err
    assert cli(example_chat_completion.cli, "--ckpt_dir", "X", "--tokenizer_path", TOKENIZER, "--dialogs",
               str(tmp_path / "absent.json")) == 2
    assert f"cannot read --dialogs {tmp_path / 'absent.json'}: No such file" in capsys.readouterr().err
