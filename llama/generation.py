"""Llama: Meta's reference API (build, generate, text and chat completion) plus streams."""

import threading
from contextlib import contextmanager
from typing import Iterator, List, Optional, Tuple, TypedDict

import torch

from llama import decoding
from llama.build import BuildOptions, build
from llama.chat_format import UNSAFE_ERROR, Dialog, Message, encode_dialog, has_special_tags, validate_dialog
from llama.fast import FaithfulDecoder
from llama.layout import DEFAULT_GROUP
from llama.model import Transformer
from llama.options import Options
from llama.tokenizer import Tokenizer


class CompletionPrediction(TypedDict, total=False):
    generation: str
    tokens: List[str]  # not required
    logprobs: List[float]  # not required


class ChatPrediction(TypedDict, total=False):
    generation: Message
    tokens: List[str]  # not required
    logprobs: List[float]  # not required


class Llama:
    """A model and its tokenizer, ready to generate.

    One object serves one request at a time: calls from several threads are served one after
    another, whole (a stream holds the model from its first piece to its last, or until it is
    closed). Starting a second call in the thread that holds an open stream is refused.
    """

    @staticmethod
    def build(
        ckpt_dir: str,
        tokenizer_path: str,
        max_seq_len: int,
        max_batch_size: int,
        model_parallel_size: Optional[int] = None,
        seed: int = 1,
        *,
        dtype=None,
        device: Optional[str] = None,
        fast: Optional[bool] = None,
        compile=None,
        quantize: Optional[str] = None,
        group_size: int = DEFAULT_GROUP,
        threads: Optional[int] = None,
    ) -> "Llama":
        """Loads a Meta checkpoint and tokenizer, ready to generate.

        Args:
            ckpt_dir: folder with params.json and consolidated.*.pth shards (any shard
                count: they are resharded at load time to the model-parallel size), or a
                Hugging Face Llama folder (config.json and safetensors or .bin weights).
            tokenizer_path: the SentencePiece tokenizer.model.
            max_seq_len: longest prompt + generation, in tokens.
            max_batch_size: most prompts per call.
            model_parallel_size: processes the model is split over (default: WORLD_SIZE, else 1).
            seed: torch.manual_seed for sampling; the same on every rank.
            dtype: weights/activations dtype (torch.dtype or name); default bf16 on CUDA
                (fp16 where bf16 is unsupported), float32 on CPU.
            device: 'cuda', 'cpu' or 'mps'; default CUDA when present.
            fast: decode with the fast path (joined projections, kernels, a static cache, CUDA
                graphs); default on CUDA. False runs the reference's forward pass.
            compile: accepted for compatibility; the fast path needs no compilation.
            quantize: 'int8' or 'int4' to quantize the linear layers' weights while loading
                (weight-only; int8 per output channel, int4 per group of `group_size` inputs).
                A checkpoint saved quantized (`python -m llama.tools.quantize`) loads as
                it is, whatever this says, unless it names another mode.
            group_size: input columns per int4 scale; smaller where the model's widths split
                over the processes need it.
            threads: CPU threads (default: the physical cores, shared among the processes).

        Returns:
            A Llama holding the model and tokenizer.
        """
        opts = BuildOptions(max_seq_len, max_batch_size, model_parallel_size, seed, dtype, device, fast, quantize,
                            group_size, threads)
        return Llama(*build(ckpt_dir, tokenizer_path, opts))

    def __init__(self, model: Transformer, tokenizer: Tokenizer, decoder=None):
        self.model = model
        self.tokenizer = tokenizer
        self.decoder = decoder if decoder is not None else FaithfulDecoder(model)
        self._lock = threading.Lock()
        self._holder: Optional[int] = None  # the thread that holds the model

    @property
    def device(self) -> torch.device:
        return self.model.rope.device

    @contextmanager
    def exclusive(self):
        """Holds the model for the calling thread until the block ends (one request, or an
        engine that runs the model itself); other threads' calls wait their turn."""
        me = threading.get_ident()
        if self._holder == me:
            raise RuntimeError("this thread holds an unfinished stream of this Llama: read it to the end (or close "
                               "it) before starting another request")
        with self._lock:
            self._holder = me
            try:
                yield
            finally:
                self._holder = None

    def _run(self, prompts, options: Options):
        params = self.model.params
        with self.exclusive(), torch.inference_mode():
            return decoding.run(self.decoder, self.tokenizer, prompts, options, params.max_seq_len,
                                params.max_batch_size, self.device)

    def _stream(self, prompt: List[int], options: Options) -> Iterator[str]:
        params = self.model.params
        decoding.check_prompts([prompt], options.gen_len(params.max_seq_len), self.tokenizer.n_words,
                               params.max_batch_size, params.max_seq_len)  # here, so bad input fails at the call
        return self._held(lambda: decoding.stream(self.decoder, self.tokenizer, prompt, options, params.max_seq_len,
                                                  self.device))

    def _held(self, make) -> Iterator[str]:
        with self.exclusive():
            yield from make()

    @torch.inference_mode()
    def generate(
        self,
        prompt_tokens: List[List[int]],
        max_gen_len: int,
        temperature: float = 0.6,
        top_p: float = 0.9,
        logprobs: bool = False,
        echo: bool = False,
        *,
        top_k: int = 0,
        repetition_penalty: float = 1.0,
        seed: Optional[int] = None,
    ) -> Tuple[List[List[int]], Optional[List[List[float]]]]:
        """Generates continuations of tokenized prompts.

        Args:
            prompt_tokens: one list of token ids per prompt.
            max_gen_len: most new tokens per prompt (fewer if max_seq_len is reached).
            temperature: softmax temperature; 0 picks the most likely token.
            top_p: nucleus sampling mass.
            logprobs: also return each returned token's log-probability.
            echo: return the prompt tokens too.
            top_k: sample among the k most likely tokens only (0: off).
            repetition_penalty: > 1 discourages tokens already in the sequence (1.0: off).
            seed: seeds this call's sampling alone (None: torch's global RNG, as the reference).

        Returns:
            (tokens, logprobs): per prompt, the new tokens cut at the first EOS, and
            their log-probabilities when asked (else None).
        """
        if not isinstance(max_gen_len, int) or isinstance(max_gen_len, bool) or max_gen_len < 0:
            raise ValueError(f"max_gen_len must be an int >= 0, got {max_gen_len!r}")
        options = Options(temperature, top_p, max_gen_len, logprobs, echo, top_k, repetition_penalty, None, seed)
        _, tokens, lps = self._run(prompt_tokens, options)
        return tokens, lps

    def _encode_prompts(self, prompts: List[str]) -> List[List[int]]:
        if isinstance(prompts, str):
            raise TypeError(f"prompts must be a list of strings; got one str: pass [{prompts[:30]!r}...]")
        if not isinstance(prompts, (list, tuple)) or len(prompts) == 0:
            raise ValueError("no prompts given: pass a non-empty list of strings")
        for i, p in enumerate(prompts):
            if not isinstance(p, str):
                raise TypeError(f"prompt {i} is a {type(p).__name__}, not a str: {p!r}")
        return [self.tokenizer.encode(x, bos=True, eos=False) for x in prompts]

    def _encode_dialogs(self, dialogs: List[Dialog]) -> List[List[int]]:
        if not isinstance(dialogs, (list, tuple)) or len(dialogs) == 0:
            raise ValueError("no dialogs given: pass a non-empty list of dialogs")
        for i, dialog in enumerate(dialogs):
            validate_dialog(dialog, i)
        return [encode_dialog(self.tokenizer, d) for d in dialogs]

    def _predictions(self, texts, tokens, lps, wrap):
        if lps is not None:
            return [{"generation": wrap(i, text), "tokens": [self.tokenizer.decode([x]) for x in t], "logprobs": lp}
                    for i, (text, t, lp) in enumerate(zip(texts, tokens, lps))]
        return [{"generation": wrap(i, text)} for i, text in enumerate(texts)]

    def text_completion(
        self,
        prompts: List[str],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: Optional[int] = None,
        logprobs: bool = False,
        echo: bool = False,
        *,
        top_k: int = 0,
        repetition_penalty: float = 1.0,
        stop=None,
        seed: Optional[int] = None,
    ) -> List[CompletionPrediction]:
        """Completes each prompt; returns [{"generation": str}] (+ "tokens", "logprobs" when asked).

        Beyond the reference: top_k, repetition_penalty and seed as in `generate`, and `stop`
        (a string or list of strings): each generation ends before its first stop string.
        """
        options = Options(temperature, top_p, max_gen_len, logprobs, echo, top_k, repetition_penalty, stop, seed)
        texts, tokens, lps = self._run(self._encode_prompts(prompts), options)
        return self._predictions(texts, tokens, lps, lambda i, text: text)

    def chat_completion(
        self,
        dialogs: List[Dialog],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: Optional[int] = None,
        logprobs: bool = False,
        *,
        top_k: int = 0,
        repetition_penalty: float = 1.0,
        stop=None,
        seed: Optional[int] = None,
    ) -> List[ChatPrediction]:
        """Answers each dialog as the assistant, in the Llama 2 chat format.

        Returns [{"generation": {"role": "assistant", "content": str}}] (+ "tokens",
        "logprobs" when asked). A dialog containing [INST], [/INST], <<SYS>> or <</SYS>>
        is answered with an error message as its content. top_k, repetition_penalty, stop
        and seed as in `text_completion`.
        """
        options = Options(temperature, top_p, max_gen_len, logprobs, False, top_k, repetition_penalty, stop, seed)
        prompt_tokens = self._encode_dialogs(dialogs)
        unsafe = [has_special_tags(d) for d in dialogs]
        texts, tokens, lps = self._run(prompt_tokens, options)
        return self._predictions(texts, tokens, lps, lambda i, text: {
            "role": "assistant", "content": UNSAFE_ERROR if unsafe[i] else text})

    def stream_completion(
        self,
        prompt: str,
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: Optional[int] = None,
        *,
        top_k: int = 0,
        repetition_penalty: float = 1.0,
        stop=None,
        seed: Optional[int] = None,
    ) -> Iterator[str]:
        """Yields the completion of `prompt` as text pieces while it is generated.

        The pieces join to what `text_completion` returns for the same arguments and RNG
        state; a piece never ends inside a UTF-8 character or a possible stop string.
        """
        options = Options(temperature, top_p, max_gen_len, False, False, top_k, repetition_penalty, stop, seed)
        return self._stream(self._encode_prompts([prompt])[0], options)

    def stream_chat(
        self,
        dialog: Dialog,
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: Optional[int] = None,
        *,
        top_k: int = 0,
        repetition_penalty: float = 1.0,
        stop=None,
        seed: Optional[int] = None,
    ) -> Iterator[str]:
        """Yields the assistant's answer to `dialog` as text pieces while it is generated.

        A dialog with special tags yields the error message of `chat_completion` instead.
        """
        options = Options(temperature, top_p, max_gen_len, False, False, top_k, repetition_penalty, stop, seed)
        prompt = self._encode_dialogs([dialog])[0]
        if has_special_tags(dialog):
            return iter([UNSAFE_ERROR])
        return self._stream(prompt, options)
