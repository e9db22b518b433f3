"""SentencePiece tokenizer, as Meta's reference wraps it."""

import os
import threading
from typing import List, Optional, Tuple

from sentencepiece import SentencePieceProcessor


class Tokenizer:
    """Encodes text to token ids and back with a Llama `tokenizer.model`."""

    def __init__(self, model_path: str):
        if os.path.isdir(model_path):
            inside = os.path.join(model_path, "tokenizer.model")
            hint = f"pass {inside!r}" if os.path.isfile(inside) else "pass the tokenizer.model file itself"
            raise ValueError(f"tokenizer_path {model_path!r} is a folder, not a tokenizer.model file: {hint}")
        if os.path.exists(model_path) and not os.path.isfile(model_path):
            raise ValueError(f"{model_path!r} is not a regular file (a pipe or device): pass the "
                             "tokenizer.model file")
        if not os.path.isfile(model_path):
            raise FileNotFoundError(
                f"tokenizer model not found: {model_path!r}. Pass the path of the "
                "tokenizer.model file that download.sh fetched (it sits beside the model folders)."
            )
        try:
            self.sp_model = SentencePieceProcessor(model_file=model_path)
        except Exception as e:  # sentencepiece raises RuntimeError/OSError with C++ text
            raise ValueError(
                f"{model_path!r} is not a SentencePiece model ({e}). "
                "Check the file: download it again if it is truncated or an HTML error page."
            ) from None

        self.n_words: int = self.sp_model.vocab_size()
        self.bos_id: int = self.sp_model.bos_id()
        self.eos_id: int = self.sp_model.eos_id()
        self.pad_id: int = self.sp_model.pad_id()
        assert self.sp_model.vocab_size() == self.sp_model.get_piece_size()
        self._pieces: Optional[Tuple[List[Optional[str]], List[str]]] = None
        self._pieces_lock = threading.Lock()

    def encode(self, s: str, bos: bool, eos: bool) -> List[int]:
        """Token ids of `s`, with BOS before and EOS after when asked."""
        if not isinstance(s, str):
            raise TypeError(f"can only encode str, got {type(s).__name__}: {s!r}")
        t = self.sp_model.encode(s)
        if bos:
            t = [self.bos_id] + t
        if eos:
            t = t + [self.eos_id]
        return t

    def decode(self, t: List[int]) -> str:
        return self.sp_model.decode(t)

    def pieces(self) -> Tuple[List[Optional[str]], List[str]]:
        """Per token id: the text it adds after text that is already there (None for byte,
        unknown and control tokens, whose text depends on their neighbours), and its text
        alone (`decode([id])`). Built on first use (a few tenths of a second), for
        incremental decoding (`llama.streaming.TextStream`); `Llama.build` makes them in a
        thread while the weights load."""
        with self._pieces_lock:
            if self._pieces is None:
                self._pieces = self._make_pieces()
        return self._pieces

    def _make_pieces(self) -> Tuple[List[Optional[str]], List[str]]:
        sp = self.sp_model
        joined: List[Optional[str]] = []
        for i in range(self.n_words):
            piece = sp.id_to_piece(i)
            plain = not (sp.is_byte(i) or sp.is_unknown(i) or sp.is_control(i) or sp.is_unused(i))
            joined.append(piece.replace("\u2581", " ") if plain and "\ufffd" not in piece else None)
        return joined, sp.decode([[i] for i in range(self.n_words)])  # (one call: a C++ loop)
