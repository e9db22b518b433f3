"""Text completion with a Llama 2 base model.

    torchrun --nproc_per_node 1 example_text_completion.py \
        --ckpt_dir llama-2-7b/ --tokenizer_path tokenizer.model

Flags and defaults are those of Meta's reference example, plus the library's own
(`--help` lists them all): `--prompt` completes your own text instead of the built-in
prompts, `--stream` prints text as it is generated, and sampling, dtype, device and
quantization controls.
"""

from typing import List, Optional

from llama import Llama
from llama.cli import MODEL_FLAGS, SAMPLING_FLAGS, Parser, build_kwargs, sampling_kwargs
from llama.distributed import run_main

PROMPTS = [
    # Plain prompts: the expected answer is the natural continuation.
    "I believe the meaning of life is",
    "Simply put, the theory of relativity states that ",
    """A brief message congratulating the team on the launch:

        Hi everyone,

        I just """,
    # Few-shot prompt: a few examples before the one to complete.
    """Translate English to French:

        sea otter => loutre de mer
        peppermint => menthe poivrée
        plush girafe => girafe peluche
        cheese =>""",
]


def main(
    ckpt_dir: str,
    tokenizer_path: str,
    temperature: float = 0.6,
    top_p: float = 0.9,
    max_seq_len: int = 128,
    max_gen_len: int = 64,
    max_batch_size: int = 4,
    prompt: Optional[str] = None,
    stream: bool = False,
    top_k: int = 0,
    repetition_penalty: float = 1.0,
    stop=None,
    seed: Optional[int] = None,
    **build_options,
):
    generator = Llama.build(ckpt_dir=ckpt_dir, tokenizer_path=tokenizer_path, max_seq_len=max_seq_len,
                            max_batch_size=max_batch_size, **build_options)
    prompts = [str(prompt)] if prompt is not None else PROMPTS
    controls = dict(temperature=temperature, top_p=top_p, max_gen_len=max_gen_len, top_k=top_k,
                    repetition_penalty=repetition_penalty, stop=stop, seed=seed)
    if stream:
        for text in prompts:
            print(text)
            print("> ", end="", flush=True)
            for piece in generator.stream_completion(text, **controls):
                print(piece, end="", flush=True)
            print("\n\n==================================\n")
        return
    for start in range(0, len(prompts), max_batch_size):
        batch = prompts[start : start + max_batch_size]
        results = generator.text_completion(batch, **controls)
        for text, result in zip(batch, results):
            print(text)
            print(f"> {result['generation']}")
            print("\n==================================\n")


def parser() -> Parser:
    p = Parser(__doc__.split("\n\n")[0])
    p.add(MODEL_FLAGS, ckpt_dir=dict(required=True), tokenizer_path=dict(required=True),
          max_seq_len=dict(default=128), max_batch_size=dict(default=4))
    p.add(SAMPLING_FLAGS, max_gen_len=dict(default=64))
    p.add(("prompt", "stream"))
    return p


def cli(argv: Optional[List[str]] = None) -> None:
    p = parser()
    a = p.parse_args(argv)
    with p.speaking_flags():
        main(a.ckpt_dir, a.tokenizer_path, prompt=a.prompt, stream=a.stream, **sampling_kwargs(a), **build_kwargs(a))


if __name__ == "__main__":
    run_main(cli)
