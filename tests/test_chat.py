"""The interactive chat: session logic, and the CLI driven through a pipe (1 and 2 processes)."""

import subprocess
import sys

import pytest

from llama.tools.chat import ChatSession
from tests.conftest import REPO, TOKENIZER, torchrun

SCRIPT = "Hello there\n/system Answer in French\nHow are you?\n/reset\n/bogus\nThird question\n"


def test_session_history_system_and_reset(gqa):
    chat = ChatSession(gqa, max_gen_len=6, temperature=0)
    first = "".join(chat.answer("Hello"))
    assert chat.history == [("Hello", first)]
    assert "set" in chat.command("/system Be brief")
    assert chat.dialog("Next") == [
        {"role": "system", "content": "Be brief"},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": first},
        {"role": "user", "content": "Next"},
    ]
    # the streamed answer is the chat_completion answer to the same dialog
    want = gqa.chat_completion([chat.dialog("Next")], temperature=0, max_gen_len=6)[0]["generation"]["content"]
    assert "".join(chat.answer("Next")) == want
    assert chat.command("/reset") == "(conversation cleared)" and chat.history == []
    assert chat.command("/system") == "(system prompt cleared)" and chat.system is None
    assert chat.command("hello") is None and "unknown command" in chat.command("/nope")


def test_session_drops_oldest_turns_to_fit(gqa):
    chat = ChatSession(gqa, max_gen_len=8, temperature=0)  # max_seq_len 64: 56 tokens for the prompt
    chat.history = [("one " * 12, "uno"), ("two " * 12, "dos")]  # 66 tokens with all, 43 without the first
    pieces = list(chat.answer("three " * 12))
    assert pieces[0] == "(dropped the 1 oldest exchange(s) to fit --max_seq_len)\n"
    assert [q for q, _ in chat.history] == ["two " * 12, "three " * 12]
    assert list(chat.answer("word " * 100)) == ["(message too long for --max_seq_len 64; not sent)"]


def expect_transcript(out: str):
    assert out.count("> Assistant: ") == 3
    assert "(system prompt set: Answer in French)" in out and "(conversation cleared)" in out
    assert "(unknown command /bogus;" in out


def test_cli_through_a_pipe(ckpts):
    res = subprocess.run([sys.executable, "-m", "llama.tools.chat", "--ckpt_dir", ckpts["gqa1"], "--tokenizer_path",
                          TOKENIZER, "--max_gen_len", "6", "--max_seq_len", "64"],
                         input=SCRIPT, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert res.returncode == 0, res.stderr[-2000:]
    expect_transcript(res.stdout)


@pytest.mark.multiproc
def test_cli_under_torchrun(ckpts, tmp_path):
    script = tmp_path / "input.txt"
    script.write_text(SCRIPT)
    with open(script) as stdin:
        res = torchrun(2, "-m", "llama.tools.chat", "--ckpt_dir", ckpts["gqa2"], "--tokenizer_path", TOKENIZER,
                       "--max_gen_len", "6", "--max_seq_len", "64", stdin=stdin)
    assert res.returncode == 0, res.stderr[-2000:]
    expect_transcript(res.stdout)
