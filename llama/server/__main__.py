"""Serve a model over HTTP in OpenAI's API, with continuous batching.

    python -m llama.server --ckpt_dir llama-2-7b-chat --tokenizer_path tokenizer.model
    torchrun --nproc_per_node 2 -m llama.server --ckpt_dir llama-2-13b-chat --tokenizer_path tokenizer.model

Rank 0 serves HTTP and runs the engine; the other ranks run each step with it.
"""

import os
import signal
from typing import Callable, Optional

import uvicorn

from llama import Llama
from llama.cli import MODEL_FLAGS, Parser, build_kwargs
from llama.distributed import is_rank_zero, run_main
from llama.engine import Engine
from llama.lockstep import Lockstep
from llama.server.app import MAX_BODY_BYTES, create_app


class _Server(uvicorn.Server):
    """uvicorn's server, calling `on_ready` once it accepts connections."""

    def __init__(self, config: uvicorn.Config, on_ready: Callable[[], None]):
        super().__init__(config)
        self.on_ready = on_ready

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if self.started:
            self.on_ready()


def serve(llama: Llama, host: str, port: int, model_name: str, api_key: Optional[str] = None, max_queue: int = 64,
          max_body_bytes: int = MAX_BODY_BYTES) -> None:
    """Runs the engine and the HTTP server until interrupted; prints the address once ready."""
    with Engine(llama, max_queue) as engine:
        config = uvicorn.Config(create_app(engine, model_name, api_key, max_body_bytes), host=host, port=port,
                                timeout_graceful_shutdown=5)
        sock = config.bind_socket()
        bound_host, bound_port = sock.getsockname()[:2]
        where = f"[{bound_host}]" if ":" in bound_host else bound_host

        def ready():
            print(f"Serving {model_name!r} on http://{where}:{bound_port}/v1 ({engine.max_batch_size} slots, "
                  f"max_seq_len {engine.max_seq_len})", flush=True)

        signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM ends the server as Ctrl-C does
        try:
            _Server(config, ready).run(sockets=[sock])
        except KeyboardInterrupt:  # uvicorn raises the signal again once it has shut down
            pass


def main(argv=None) -> None:
    p = Parser(__doc__.split("\n\n")[0])
    p.add(MODEL_FLAGS, ckpt_dir=dict(required=True), tokenizer_path=dict(required=True),
          max_seq_len=dict(default=2048), max_batch_size=dict(default=8, help="slots: requests decoded together"))
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (0: any free one)")
    p.add_argument("--model_name", default=None, help="the model id clients name (default: the ckpt_dir's name)")
    p.add_argument("--api_key", default=os.environ.get("LLAMA_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (default: $LLAMA_API_KEY; unset: no key)")
    p.add_argument("--max_queue", type=int, default=64, help="requests that may wait for a slot (then 503)")
    p.add_argument("--max_body_bytes", type=int, default=MAX_BODY_BYTES, help="larger request bodies get a 413")
    p.add_argument("--seed", type=int, default=1, help="torch.manual_seed for requests without a seed")
    a = p.parse_args(argv)

    llama = Llama.build(a.ckpt_dir, a.tokenizer_path, seed=a.seed, **build_kwargs(a))
    if not is_rank_zero():
        for sig in (signal.SIGINT, signal.SIGTERM):  # Ctrl-C reaches every rank: leave when rank 0 says so
            signal.signal(sig, signal.SIG_IGN)
        with llama.exclusive():
            Lockstep(llama.model, llama.decoder).follow()
        return
    name = a.model_name or os.path.basename(os.path.normpath(a.ckpt_dir))
    serve(llama, a.host, a.port, name, a.api_key, a.max_queue, a.max_body_bytes)


if __name__ == "__main__":
    run_main(main)
