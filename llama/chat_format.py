"""Llama 2 chat format: dialogs to prompt tokens."""

from typing import List, Literal, Optional, TypedDict

from llama.tokenizer import Tokenizer

Role = Literal["system", "user", "assistant"]


class Message(TypedDict):
    role: Role
    content: str


Dialog = List[Message]

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
SPECIAL_TAGS = [B_INST, E_INST, "<<SYS>>", "<</SYS>>"]
UNSAFE_ERROR = "Error: special tags are not allowed as part of the prompt."


def validate_dialog(dialog: Dialog, index: Optional[int] = None) -> None:
    """Raises ValueError unless `dialog` is a list of {role, content} messages in chat order."""
    where = "dialog" if index is None else f"dialog {index}"
    if not isinstance(dialog, list) or not dialog:
        raise ValueError(f"{where} must be a non-empty list of messages, got {dialog!r}")
    for i, msg in enumerate(dialog):
        if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
            raise ValueError(f"{where}, message {i}: expected a dict with 'role' and 'content', got {msg!r}")
        if msg["role"] not in ("system", "user", "assistant"):
            raise ValueError(
                f"{where}, message {i}: unknown role {msg['role']!r}; use 'system', 'user' or 'assistant'"
            )
        if not isinstance(msg["content"], str):
            raise TypeError(f"{where}, message {i}: content must be a str, got {type(msg['content']).__name__}")
    roles = [m["role"] for m in merge_system(dialog)]
    expected = ["user" if i % 2 == 0 else "assistant" for i in range(len(roles))]
    if roles != expected or roles[-1] != "user":
        raise ValueError(
            f"{where} has roles {roles} (after merging a leading system message): roles must be "
            "'user', 'assistant', 'user', ... alternating, with an optional 'system' message first, "
            "and the dialog must end with a 'user' message"
        )


def has_special_tags(dialog: Dialog) -> bool:
    return any(tag in msg["content"] for tag in SPECIAL_TAGS for msg in dialog)


def merge_system(dialog: Dialog) -> Dialog:
    """Folds a leading system message into the first user message, as Llama 2 was trained."""
    if dialog[0]["role"] != "system" or len(dialog) < 2:
        return dialog
    merged = {"role": dialog[1]["role"], "content": B_SYS + dialog[0]["content"] + E_SYS + dialog[1]["content"]}
    return [merged] + dialog[2:]


def encode_dialog(tokenizer: Tokenizer, dialog: Dialog) -> List[int]:
    """Prompt tokens for `dialog`: each exchange BOS [INST] user [/INST] answer EOS, then the last user turn."""
    validate_dialog(dialog)
    dialog = merge_system(dialog)
    tokens: List[int] = []
    for prompt, answer in zip(dialog[::2], dialog[1::2]):
        text = f"{B_INST} {prompt['content'].strip()} {E_INST} {answer['content'].strip()} "
        tokens += tokenizer.encode(text, bos=True, eos=True)
    tokens += tokenizer.encode(f"{B_INST} {dialog[-1]['content'].strip()} {E_INST}", bos=True, eos=False)
    return tokens
