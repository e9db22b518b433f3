"""Text completion with a Llama 2 base model.

    torchrun --nproc_per_node 1 example_text_completion.py \
        --ckpt_dir llama-2-7b/ --tokenizer_path tokenizer.model

Flags and defaults are those of Meta's reference example; `--prompt` completes your
own text instead of the built-in prompts, `--dtype` picks the precision.
"""

from typing import Optional

import fire

from llama import Llama

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
    dtype: Optional[str] = None,
):
    generator = Llama.build(
        ckpt_dir=ckpt_dir,
        tokenizer_path=tokenizer_path,
        max_seq_len=max_seq_len,
        max_batch_size=max_batch_size,
        dtype=dtype,
    )
    prompts = [str(prompt)] if prompt is not None else PROMPTS
    for start in range(0, len(prompts), max_batch_size):
        batch = prompts[start : start + max_batch_size]
        results = generator.text_completion(batch, max_gen_len=max_gen_len, temperature=temperature, top_p=top_p)
        for text, result in zip(batch, results):
            print(text)
            print(f"> {result['generation']}")
            print("\n==================================\n")


if __name__ == "__main__":
    fire.Fire(main)
