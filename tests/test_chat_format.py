import pytest

from llama import Tokenizer
from llama.chat_format import UNSAFE_ERROR, encode_dialog, has_special_tags, validate_dialog
from tests.conftest import TOKENIZER


@pytest.fixture(scope="module")
def tok():
    return Tokenizer(TOKENIZER)


def enc(tok, text, eos):
    return tok.encode(text, bos=True, eos=eos)


def test_single_user_turn(tok):
    got = encode_dialog(tok, [{"role": "user", "content": "  Hi there \n"}])
    assert got == enc(tok, "[INST] Hi there [/INST]", eos=False)
    assert got[:1] == [1] and got[-1] != 2


def test_system_prompt_is_merged_and_stripped(tok):
    dialog = [{"role": "system", "content": " Be brief. "}, {"role": "user", "content": "Hi"}]
    got = encode_dialog(tok, dialog)
    assert got == enc(tok, "[INST] <<SYS>>\n Be brief. \n<</SYS>>\n\nHi [/INST]", eos=False)


def test_multi_turn(tok):
    dialog = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "Q1 "},
        {"role": "assistant", "content": " A1"},
        {"role": "user", "content": "Q2"},
    ]
    want = enc(tok, "[INST] <<SYS>>\nS\n<</SYS>>\n\nQ1 [/INST] A1 ", eos=True) + enc(tok, "[INST] Q2 [/INST]", eos=False)
    assert encode_dialog(tok, dialog) == want


@pytest.mark.parametrize(
    "dialog, match",
    [
        ([{"role": "assistant", "content": "x"}], "roles must be"),
        ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "end with a 'user'"),
        ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "alternating"),
        ([{"role": "system", "content": "s"}], "roles must be"),
        ([{"role": "bot", "content": "a"}], "unknown role 'bot'"),
        ([{"content": "a"}], "'role' and 'content'"),
        ([], "non-empty list"),
    ],
)
def test_bad_dialogs(dialog, match):
    with pytest.raises(ValueError, match=match):
        validate_dialog(dialog)


def test_special_tags():
    assert has_special_tags([{"role": "user", "content": "a <<SYS>> b"}])
    assert not has_special_tags([{"role": "user", "content": "a [INS] b"}])
    assert UNSAFE_ERROR == "Error: special tags are not allowed as part of the prompt."
