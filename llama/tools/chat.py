"""Interactive chat with a Llama 2 chat model, streaming each answer.

    python -m llama.tools.chat --ckpt_dir llama-2-7b-chat --tokenizer_path tokenizer.model
    torchrun --nproc_per_node 2 -m llama.tools.chat --ckpt_dir llama-2-13b-chat --tokenizer_path tokenizer.model

Commands: /reset (forget the conversation), /system TEXT (set the system prompt; /system
alone clears it), /exit. Ctrl-C stops the current answer and keeps the session (under
torchrun too, where rank 0 reads it from its terminal as a key while an answer streams;
at the prompt it ends the run); end of input (Ctrl-D, or a closed pipe) exits. When the
conversation no longer fits max_seq_len, the oldest exchanges are dropped, and the chat
says so.
"""

import contextlib
import os
import select
import sys
from typing import Callable, Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist

from llama import Llama
from llama.chat_format import Dialog, encode_dialog
from llama.cli import MODEL_FLAGS, SAMPLING_FLAGS, Parser, build_kwargs, sampling_kwargs
from llama.distributed import is_rank_zero, run_main, share

HELP = "commands: /reset (forget the conversation), /system TEXT (set the system prompt), /exit"


class ChatSession:
    """A conversation: history, system prompt, fitting into max_seq_len, commands."""

    def __init__(self, llama, system: Optional[str] = None, max_gen_len: Optional[int] = None, **sampling):
        self.llama = llama
        self.system = system or None
        self.history: List[Tuple[str, str]] = []
        self.max_gen_len = max_gen_len
        self.sampling = sampling
        max_seq_len = llama.model.params.max_seq_len
        self.reserve = max_gen_len if max_gen_len is not None else max(16, max_seq_len // 4)  # room for the answer

    def dialog(self, user: str) -> Dialog:
        msgs: Dialog = [{"role": "system", "content": self.system}] if self.system else []
        for question, answer in self.history:
            msgs += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        return msgs + [{"role": "user", "content": user}]

    def fit(self, user: str) -> Tuple[Optional[Dialog], int]:
        """The dialog to send, after dropping the oldest exchanges as needed (None: even the
        new message alone does not fit), and how many exchanges were dropped."""
        limit = self.llama.model.params.max_seq_len - self.reserve
        dropped = 0
        while True:
            dialog = self.dialog(user)
            if len(encode_dialog(self.llama.tokenizer, dialog)) <= limit:
                return dialog, dropped
            if not self.history:
                return None, dropped
            self.history.pop(0)
            dropped += 1

    def command(self, line: str) -> Optional[str]:
        """Handles a /command; returns what to tell the user, or None if `line` is a message."""
        if not line.startswith("/"):
            return None
        name, _, arg = line.partition(" ")
        if name == "/reset":
            self.history.clear()
            return "(conversation cleared)"
        if name == "/system":
            self.system = arg.strip() or None
            return f"(system prompt set: {self.system})" if self.system else "(system prompt cleared)"
        return f"(unknown command {name}; {HELP})"

    def answer(self, user: str, stopped: Optional[Callable[[], bool]] = None) -> Iterator[str]:
        """Streams the answer to `user` and records the exchange (also when stopped early: by
        closing this generator, or when `stopped()`, asked after each piece, says so)."""
        dialog, dropped = self.fit(user)
        if dialog is None:
            yield f"(message too long for --max_seq_len {self.llama.model.params.max_seq_len}; not sent)"
            return
        if dropped:
            yield f"(dropped the {dropped} oldest exchange(s) to fit --max_seq_len)\n"
        text = ""
        stream = self.llama.stream_chat(dialog, max_gen_len=self.max_gen_len, **self.sampling)
        try:
            for piece in stream:
                text += piece
                yield piece
                if stopped is not None and stopped():
                    yield " (stopped)"
                    break
        finally:
            stream.close()
            self.history.append((user, text))


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def read_line(prompt: str) -> Optional[str]:
    """A line from rank 0's stdin, shared with every rank; None at end of input. Ctrl-C here
    clears the line with one process; under torchrun it ends the run (torchrun takes it)."""
    line = None
    if is_rank_zero():
        try:
            line = input(prompt) if sys.stdin.isatty() else sys.stdin.readline()
            if line == "" and not sys.stdin.isatty():
                line = None  # end of a pipe
        except EOFError:
            line = None
        except KeyboardInterrupt:
            if world_size() > 1:
                raise
            line = ""
            print()
    line = share(line)
    return None if line is None else line.strip()


@contextlib.contextmanager
def ctrl_c_as_key(device: torch.device):
    """Under torchrun, a Ctrl-C at the terminal goes to torchrun, which ends the run. While an
    answer streams, rank 0's terminal (if stdin is one) sends keys instead of signals; yields
    `stopped()`, which every rank calls after each piece: whether rank 0 read a Ctrl-C."""
    fd = sys.stdin.fileno()
    saved = None
    if is_rank_zero() and sys.stdin.isatty():
        import termios

        saved = termios.tcgetattr(fd)
        keys = list(saved)
        keys[3] &= ~(termios.ISIG | termios.ICANON | termios.ECHO)  # lflags: no signals, no line editing
        keys[6] = list(saved[6])
        keys[6][termios.VMIN], keys[6][termios.VTIME] = 0, 0  # reads return at once
        termios.tcsetattr(fd, termios.TCSANOW, keys)

    def stopped() -> bool:
        flag = torch.zeros(1, dtype=torch.int32, device=device)
        if saved is not None and select.select([fd], [], [], 0)[0] and b"\x03" in os.read(fd, 1024):
            flag.fill_(1)
        dist.broadcast(flag, src=0)
        return bool(flag.item())

    try:
        yield stopped
    finally:
        if saved is not None:
            termios.tcsetattr(fd, termios.TCSANOW, saved)


def run(session: ChatSession) -> None:
    out = sys.stdout
    while True:
        line = read_line("User: ")
        if line is None or line == "/exit":
            break
        if not line:
            continue
        reply = session.command(line)
        if reply is not None:
            print(reply, file=out, flush=True)
            continue
        print("> Assistant: ", end="", file=out, flush=True)
        if world_size() > 1:
            with ctrl_c_as_key(session.llama.device) as stopped:
                for piece in session.answer(line, stopped):
                    print(piece, end="", file=out, flush=True)
        else:
            try:
                for piece in session.answer(line):
                    print(piece, end="", file=out, flush=True)
            except KeyboardInterrupt:
                print(" (stopped)", end="", file=out)
        print("\n", file=out, flush=True)


def parser() -> Parser:
    p = Parser(__doc__.split("\n\n")[0], epilog=HELP + "; Ctrl-C stops an answer, Ctrl-D (end of input) quits")
    p.add(MODEL_FLAGS, ckpt_dir=dict(required=True), tokenizer_path=dict(required=True),
          max_seq_len=dict(default=2048), max_batch_size=dict(default=1))
    p.add(SAMPLING_FLAGS, seed=dict(default=1, type=int, help="seed of the sampling"))
    p.add(("system",))
    return p


def main(argv=None) -> None:
    p = parser()
    a = p.parse_args(argv)
    with p.speaking_flags():
        llama = Llama.build(a.ckpt_dir, a.tokenizer_path, seed=a.seed, **build_kwargs(a))
    sampling = sampling_kwargs(a)
    max_gen_len, sampling["seed"] = sampling.pop("max_gen_len"), None
    session = ChatSession(llama, a.system, max_gen_len, **sampling)
    if sys.stdin.isatty() and is_rank_zero():
        print(f"Chatting with {a.ckpt_dir}. {HELP}; Ctrl-C stops an answer, Ctrl-D quits.")
    run(session)


if __name__ == "__main__":
    run_main(main)
