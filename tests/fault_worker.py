"""Run under torchrun by the reliability tests: a fault on one rank, or a run long enough to interrupt.

    python -m torch.distributed.run --nproc_per_node 2 tests/fault_worker.py MODE CKPT_DIR TOKENIZER [PID_FILE]
"""

import os
import signal
import sys

import torch.distributed as dist

from llama import Llama
from llama.distributed import run_main


def main(mode: str, ckpt_dir: str, tokenizer_path: str, pid_file: str = "") -> None:
    llama = Llama.build(ckpt_dir, tokenizer_path, max_seq_len=512, max_batch_size=4, dtype="float32")
    rank = dist.get_rank()
    if mode == "error_on_rank1":  # too many prompts, on rank 1 only
        llama.text_completion(["hi"] * (5 if rank == 1 else 1), max_gen_len=8)
    elif mode == "error_everywhere":
        llama.text_completion(["hi"] * 5, max_gen_len=8)
    elif mode == "stop_rank1":  # rank 1 stops answering between two requests
        for i in range(1000):
            if i == 2 and rank == 1:
                with open(pid_file, "w") as f:
                    f.write(str(os.getpid()))
                os.kill(os.getpid(), signal.SIGSTOP)
            llama.text_completion(["hi"], max_gen_len=4, temperature=0)
    elif mode == "long":  # generates for about a minute (the same number of requests on every rank)
        print("generating", flush=True)
        for _ in range(200):
            llama.text_completion(["hi"], max_gen_len=100)


if __name__ == "__main__":
    run_main(lambda: main(*sys.argv[1:]))
