"""The example chat run the way Meta's reference runs it, for timing beside ours.

    torchrun --nproc_per_node 1 benchmarks/reference_style.py --ckpt_dir DIR --tokenizer_path T \
        [--max_seq_len 512] [--max_batch_size 8] [--max_gen_len N]

As the reference's `Llama.build`: the whole shard read into host memory with torch.load,
the model made on the GPU in fp16 with its random initialisation, the weights copied in
with load_state_dict; then the reference's decode loop on the faithful forward (a host
sync every step) over the example's dialogs. This library's own code computes it (the
faithful model and loop), so it times the reference's way of doing things, not its files.
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llama import Llama  # noqa: E402
from llama.checkpoint import read_params  # noqa: E402
from llama.config import ModelArgs  # noqa: E402
from llama.distributed import init_model_parallel, shutdown  # noqa: E402
from llama.fast import FaithfulDecoder  # noqa: E402
from llama.model import Transformer  # noqa: E402
from llama.tokenizer import Tokenizer  # noqa: E402

import example_chat_completion as example  # noqa: E402  (the example's own dialogs)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--ckpt_dir", required=True)
    p.add_argument("--tokenizer_path", required=True)
    p.add_argument("--max_seq_len", type=int, default=512)
    p.add_argument("--max_batch_size", type=int, default=8)
    p.add_argument("--max_gen_len", type=int, default=None)
    a = p.parse_args()
    start = time.time()
    init_model_parallel(1, torch.device("cuda"))
    torch.cuda.set_device(0)
    torch.manual_seed(1)
    checkpoint = torch.load(sorted(Path(a.ckpt_dir).glob("*.pth"))[0], map_location="cpu")
    tokenizer = Tokenizer(a.tokenizer_path)
    args = ModelArgs(max_seq_len=a.max_seq_len, max_batch_size=a.max_batch_size, **read_params(a.ckpt_dir))
    args.vocab_size = tokenizer.n_words
    torch.set_default_dtype(torch.float16)
    with torch.device("cuda"):
        model = Transformer(args)
    torch.set_default_dtype(torch.float32)
    model.load_state_dict(checkpoint, strict=False)
    del checkpoint
    print(f"Loaded in {time.time() - start:.2f} seconds")
    generator = Llama(model, tokenizer, FaithfulDecoder(model))
    results = generator.chat_completion(example.DIALOGS, max_gen_len=a.max_gen_len)
    for dialog, result in zip(example.DIALOGS, results):
        for msg in dialog:
            print(f"{msg['role'].capitalize()}: {msg['content']}\n")
        print(f"> {result['generation']['role'].capitalize()}: {result['generation']['content']}")
        print("\n==================================\n")


if __name__ == "__main__":
    main()
    shutdown()
