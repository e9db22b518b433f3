"""The OpenAI request bodies the server takes, as pydantic models.

Fields OpenAI defines that the server does not honour are refused with a 400 when they
ask for something (`unsupported`); fields nobody defines are refused by the models
(`extra="forbid"`). `top_k` and `repetition_penalty` are extensions (as vLLM's).
"""

from typing import Any, Dict, List, Optional, Tuple, Union

from pydantic import BaseModel, ConfigDict, Field

from llama.engine import MAX_TOP_LOGPROBS


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(Body):
    include_usage: bool = False


class Sampling(Body):
    """What completions and chat completions share."""

    model: str
    max_tokens: Optional[int] = Field(None, ge=0)
    temperature: Optional[float] = Field(None, ge=0)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    top_k: Optional[int] = Field(None, ge=0)
    repetition_penalty: Optional[float] = Field(None, gt=0)
    stop: Union[str, List[str], None] = None
    seed: Optional[int] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    n: Optional[int] = 1
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    logit_bias: Optional[Dict[str, float]] = None
    user: Optional[str] = None  # accepted, not used

    def unsupported(self) -> Optional[Tuple[str, str]]:
        """(field, why) for the first value asked for that the server cannot honour."""
        if self.n not in (None, 1):
            return "n", "n must be 1: this server returns one choice per prompt"
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) not in (None, 0):
                return name, f"{name} is not supported; repetition_penalty (> 1) discourages repeats"
        if self.logit_bias:
            return "logit_bias", "logit_bias is not supported"
        if self.stream_options is not None and not self.stream:
            return "stream_options", "stream_options is only allowed with stream: true"
        return None


class CompletionRequest(Sampling):
    prompt: Union[str, List[str]]
    echo: bool = False
    logprobs: Optional[int] = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    best_of: Optional[int] = None
    suffix: Optional[str] = None

    def unsupported(self) -> Optional[Tuple[str, str]]:
        if self.best_of not in (None, 1):
            return "best_of", "best_of must be 1"
        if self.suffix:
            return "suffix", "suffix (insertion) is not supported"
        return super().unsupported()


class ChatMessage(Body):
    role: str  # checked with the dialog (llama.chat_format), with a message that says what is allowed
    content: Union[str, List[Dict[str, Any]]]  # a string, or text parts [{"type": "text", "text": ...}]


class ChatRequest(Sampling):
    messages: List[ChatMessage]
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    max_completion_tokens: Optional[int] = Field(None, ge=0)

    def unsupported(self) -> Optional[Tuple[str, str]]:
        if self.top_logprobs and not self.logprobs:
            return "top_logprobs", "top_logprobs needs logprobs: true"
        if None not in (self.max_tokens, self.max_completion_tokens) and self.max_tokens != self.max_completion_tokens:
            return "max_completion_tokens", "max_tokens and max_completion_tokens differ; give one"
        return super().unsupported()
