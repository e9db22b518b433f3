import pytest

from llama import Tokenizer
from tests.conftest import TOKENIZER


@pytest.fixture(scope="module")
def tok():
    return Tokenizer(TOKENIZER)


def test_special_ids(tok):
    assert (tok.n_words, tok.bos_id, tok.eos_id, tok.pad_id) == (32000, 1, 2, -1)


def test_known_encodings(tok):
    assert tok.encode("Hello world", bos=False, eos=False) == [15043, 3186]
    assert tok.encode("[INST]", bos=False, eos=False) == [518, 25580, 29962]
    assert tok.encode("Hello world", bos=True, eos=True) == [1, 15043, 3186, 2]


@pytest.mark.parametrize("text", ["Hello world", "  leading spaces", "你好，世界", "emoji 🦙 ok", "tabs\tand\nnewlines"])
def test_round_trip(tok, text):
    assert tok.decode(tok.encode(text, bos=True, eos=False)) == text


def test_errors(tok, tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer model not found"):
        Tokenizer(str(tmp_path / "missing.model"))
    bad = tmp_path / "bad.model"
    bad.write_text("<html>expired</html>")
    with pytest.raises(ValueError, match="not a SentencePiece model"):
        Tokenizer(str(bad))
    with pytest.raises(TypeError, match="can only encode str"):
        tok.encode(123, bos=True, eos=False)
