"""OpenAI's response objects, from engine results: completions, chat completions, their
stream chunks, log-probabilities, usage and errors."""

import time
import uuid
from typing import List, Optional, Tuple

from llama.engine import Result
from llama.tokenizer import Tokenizer


class Reply:
    """What every object of one response shares: its id, creation time and model."""

    def __init__(self, kind: str, model: str):
        prefix = "chatcmpl" if kind == "chat" else "cmpl"
        self.id = f"{prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model

    def head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}


def error(message: str, type: str = "invalid_request_error", param: Optional[str] = None,
          code: Optional[str] = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def usage(results: List[Result]) -> dict:
    prompt = sum(r.prompt_tokens for r in results)
    completion = sum(r.completion_tokens for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def finish_reason(res: Result) -> Optional[str]:
    return res.finish_reason if res.finish_reason in ("stop", "length") else None


def token_text(tokenizer: Tokenizer, token: int) -> Tuple[str, List[int]]:
    """A token's own text (its leading space kept) and UTF-8 bytes; a byte-fallback token
    (a part of a character, or a byte) is 'bytes:\\xNN', as OpenAI writes such tokens."""
    sp = tokenizer.sp_model
    if sp.is_control(token):
        return "", []
    piece = sp.id_to_piece(token)
    if sp.is_byte(token):
        value = int(piece[3:-1], 16)
        return f"bytes:\\x{value:02x}", [value]
    text = piece.replace("\u2581", " ")
    return text, list(text.encode("utf-8"))


def completion_logprobs(tokenizer: Tokenizer, res: Result) -> Optional[dict]:
    """The legacy completions form: tokens, token_logprobs, top_logprobs, text_offset."""
    if res.logprobs is None:
        return None
    return {
        "tokens": [token_text(tokenizer, t)[0] for t in res.tokens],
        "token_logprobs": res.logprobs,
        "top_logprobs": [{token_text(tokenizer, t)[0]: lp for t, lp in top} for top in res.top_logprobs],
        "text_offset": res.offsets,
    }


def chat_logprobs(tokenizer: Tokenizer, res: Result) -> Optional[dict]:
    """The chat form: {"content": [{token, logprob, bytes, top_logprobs}]}."""
    if res.logprobs is None:
        return None

    def entry(token: int, lp: float) -> dict:
        text, raw = token_text(tokenizer, token)
        return {"token": text, "logprob": lp, "bytes": raw}

    return {"content": [dict(entry(t, lp), top_logprobs=[entry(a, alp) for a, alp in top])
                        for t, lp, top in zip(res.tokens, res.logprobs, res.top_logprobs)]}


def completion(reply: Reply, results: List[Result], tokenizer: Tokenizer) -> dict:
    choices = [{"index": i, "text": r.text, "logprobs": completion_logprobs(tokenizer, r),
                "finish_reason": finish_reason(r)} for i, r in enumerate(results)]
    return dict(reply.head("text_completion"), choices=choices, usage=usage(results))


def completion_chunk(reply: Reply, index: int, part: Result, tokenizer: Tokenizer) -> dict:
    choice = {"index": index, "text": part.text, "logprobs": completion_logprobs(tokenizer, part),
              "finish_reason": finish_reason(part)}
    return dict(reply.head("text_completion"), choices=[choice])


def chat_completion(reply: Reply, res: Result, tokenizer: Tokenizer) -> dict:
    choice = {"index": 0, "message": {"role": "assistant", "content": res.text},
              "logprobs": chat_logprobs(tokenizer, res), "finish_reason": finish_reason(res)}
    return dict(reply.head("chat.completion"), choices=[choice], usage=usage([res]))


def chat_chunk(reply: Reply, delta: dict, part: Optional[Result], tokenizer: Tokenizer) -> dict:
    choice = {"index": 0, "delta": delta, "logprobs": chat_logprobs(tokenizer, part) if part else None,
              "finish_reason": finish_reason(part) if part else None}
    return dict(reply.head("chat.completion.chunk"), choices=[choice])


def usage_chunk(reply: Reply, obj: str, results: List[Result]) -> dict:
    """The last chunk of a stream with stream_options.include_usage: no choices, the usage."""
    return dict(reply.head(obj), choices=[], usage=usage(results))
