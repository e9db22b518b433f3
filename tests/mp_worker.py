"""Run under torchrun by the multi-process tests: builds a model and writes rank 0's greedy output as JSON."""

import argparse
import json
import sys

from llama import Llama
from llama.cli import boolean
from llama.distributed import shutdown


def main(ckpt_dir: str, tokenizer_path: str, out: str, max_gen_len: int = 8, **build_kwargs):
    llama = Llama.build(ckpt_dir, tokenizer_path, max_seq_len=64, max_batch_size=4, dtype="float32", **build_kwargs)
    prompts = ["Hello world", "I believe the meaning of life is", "你好"]
    text = llama.text_completion(prompts, temperature=0, max_gen_len=max_gen_len, logprobs=True)
    chat = llama.chat_completion([[{"role": "user", "content": "hi"}]], temperature=0, max_gen_len=max_gen_len)
    sys.stdout = sys.__stdout__
    import torch.distributed as dist

    import torch

    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump({"text": text, "chat": chat, "threads": torch.get_num_threads()}, f)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    for name in ("ckpt_dir", "tokenizer_path", "out"):
        p.add_argument(f"--{name}", required=True)
    p.add_argument("--max_gen_len", type=int, default=8)
    p.add_argument("--quantize", default=None)
    p.add_argument("--group_size", type=int, default=None)
    p.add_argument("--fast", type=boolean, default=None)
    a = vars(p.parse_args())
    main(**{k: v for k, v in a.items() if v is not None})
    shutdown()
