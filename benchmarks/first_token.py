"""Prints when each stage of a first request ends, as seconds since this process began,
and every decode step's time over a long generation (for benchmarks/startup.py).

    python benchmarks/first_token.py --ckpt_dir DIR [--quantize int4] [--tokens 2000]
"""

import time

T0 = time.time()

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from llama import Llama  # noqa: E402
from llama import decoding  # noqa: E402
from llama.options import Options  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from common import TOKENIZER, no_eos  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--ckpt_dir", required=True)
    p.add_argument("--quantize", default=None)
    p.add_argument("--tokens", type=int, default=2000)
    p.add_argument("--max_batch_size", type=int, default=8)
    a = p.parse_args()
    marks = {"imported": time.time() - T0}
    llama = Llama.build(a.ckpt_dir, TOKENIZER, max_seq_len=a.tokens + 48, max_batch_size=a.max_batch_size,
                        quantize=a.quantize)
    marks["built"] = time.time() - T0
    first = next(iter(llama.stream_completion("I believe the meaning of life is", max_gen_len=4, temperature=0)))
    marks["first_token"] = time.time() - T0
    tok = no_eos(llama.tokenizer)
    batch = decoding.start([tok.encode("Once upon a time", bos=True, eos=False)], a.tokens, a.tokens + 48, tok,
                           llama.device, False)
    steps = []
    with torch.inference_mode():
        last = time.perf_counter()
        for cur in decoding.steps(batch, llama.decoder, Options(temperature=0).sampler(llama.device), tok):
            int(batch.tokens[0, cur])  # the token is on the host: the step is done
            now = time.perf_counter()
            steps.append(now - last)
            last = now
    marks["step_ms"] = [s * 1e3 for s in steps]
    print("MARKS " + json.dumps(marks), flush=True)
    assert first is not None


if __name__ == "__main__":
    main()
