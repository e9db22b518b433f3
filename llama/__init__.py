"""Llama 2 inference: Meta's reference API, faithful and fast."""

from llama.chat_format import Dialog, Message
from llama.generation import ChatPrediction, CompletionPrediction, Llama
from llama.model import ModelArgs, Transformer
from llama.tokenizer import Tokenizer

__version__ = "0.2.0"

__all__ = ["Llama", "Dialog", "Message", "Tokenizer", "ModelArgs", "Transformer", "ChatPrediction", "CompletionPrediction"]
