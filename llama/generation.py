"""Llama: build a model from Meta's checkpoint, then complete text and chats."""

import time
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, Tuple, TypedDict

import torch
import torch.nn.functional as F

from llama import checkpoint, distributed, memory, quant
from llama.chat_format import UNSAFE_ERROR, Dialog, Message, encode_dialog, has_special_tags, validate_dialog
from llama.fast import FaithfulDecoder, FastDecoder
from llama.loading import empty_model, load_rank
from llama.model import Transformer
from llama.parallel import parallelize
from llama.sampling import Sampler
from llama.streaming import TextStream, find_stop, validate_stop
from llama.tokenizer import Tokenizer


class CompletionPrediction(TypedDict, total=False):
    generation: str
    tokens: List[str]  # not required
    logprobs: List[float]  # not required


class ChatPrediction(TypedDict, total=False):
    generation: Message
    tokens: List[str]  # not required
    logprobs: List[float]  # not required


@dataclass
class _State:
    """One generate call's tensors, shared by the decode loop and whoever reads it."""

    tokens: torch.Tensor  # (bs, total_len), prompts right-padded with pad_id
    input_text_mask: torch.Tensor  # (bs, total_len) True where a prompt token stands
    eos_reached: torch.Tensor  # (bs,)
    token_logprobs: Optional[torch.Tensor]  # (bs, total_len) or None
    min_prompt_len: int
    total_len: int


def _quant_spec(ckpt_dir, args, quantize, group_size, world_size) -> Tuple[Optional[quant.Spec], bool]:
    """(how the linear layers are quantized or None, whether that happens while loading)."""
    quant.check_mode(quantize)
    saved = quant.spec_from_params(args.quantization)
    if saved is not None:
        if quantize not in (None, saved.mode):
            raise ValueError(
                f"{str(ckpt_dir)!r} is already quantized to {saved.mode}: build it with quantize=None "
                f"(or '{saved.mode}'), or quantize the original checkpoint to {quantize}"
            )
        return saved, False
    if quantize is None:
        return None, False
    if quantize == "int8":
        return quant.Spec("int8"), True
    group = quant.choose_group(args.dim, args.ffn_hidden_dim, group_size, world_size)
    return quant.Spec(quantize, group), True


class Llama:
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
        compile: Optional[bool] = None,
        quantize: Optional[str] = None,
        group_size: int = quant.DEFAULT_GROUP,
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
            fast: decode with the fast path (static cache, fused projections, CUDA graphs);
                default on CUDA. False runs the reference's forward pass.
            compile: torch.compile the fast path's transformer blocks (True, False, 'tuned' or
                'max-autotune'); default on CUDA.
            quantize: 'int8' or 'int4' to quantize the linear layers' weights while loading
                (weight-only; int8 per output channel, int4 per group of `group_size` inputs).
                A checkpoint saved quantized (`python -m llama.tools.quantize`) loads as
                it is, whatever this says, unless it names another mode.
            group_size: input columns per int4 scale; smaller where the model's widths split
                over the processes need it.

        Returns:
            A Llama holding the model and tokenizer.
        """
        if not isinstance(max_seq_len, int) or max_seq_len < 1:
            raise ValueError(f"max_seq_len must be a positive int, got {max_seq_len!r}")
        if not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise ValueError(f"max_batch_size must be a positive int, got {max_batch_size!r}")
        dev = distributed.choose_device(device)
        dtype = distributed.choose_dtype(dev, dtype)
        mp_rank, mp_size = distributed.init_model_parallel(model_parallel_size, dev)
        torch.manual_seed(seed)
        distributed.silence_other_ranks()

        start_time = time.time()
        tokenizer = Tokenizer(model_path=tokenizer_path)
        args = checkpoint.model_args(ckpt_dir, max_seq_len=max_seq_len, max_batch_size=max_batch_size)
        args.vocab_size = checkpoint.vocab_size(ckpt_dir, args, tokenizer.n_words)
        spec, quantizing = _quant_spec(ckpt_dir, args, quantize, group_size, mp_size)
        paths, shards = checkpoint.open_checkpoint(ckpt_dir, args, mp_size, spec if quantizing else None)
        memory.check_fits(args, dtype, mp_size, dev, spec=spec, quantizing=quantizing)

        model = parallelize(empty_model(args), mp_size)
        if spec is not None:
            quant.quantize_modules(model, spec)
        state = load_rank(paths, shards, mp_rank, mp_size, dev, dtype, spec if quantizing else None)
        model.load_state_dict(state, strict=True, assign=True)
        del state, shards
        model.requires_grad_(False)
        model.reset_buffers(dev, dtype)

        print(f"Loaded in {time.time() - start_time:.2f} seconds")
        if fast is None:
            fast = dev.type == "cuda"
        # Under model parallel too: compiled blocks and CUDA graphs around NCCL's all-reduces
        # (checked on 2 GPUs, benchmarks/RESULTS.md).
        decoder = FastDecoder(model, compile=compile) if fast else None
        if spec is not None:
            quant.prepare(model, dtype)  # after the fast path has joined its projections
        return Llama(model, tokenizer, decoder)

    def __init__(self, model: Transformer, tokenizer: Tokenizer, decoder=None):
        self.model = model
        self.tokenizer = tokenizer
        self.decoder = decoder if decoder is not None else FaithfulDecoder(model)

    @property
    def device(self) -> torch.device:
        return self.model.output.weight.device

    # -- decoding --------------------------------------------------------------------------------

    def _check_request(self, prompt_tokens, max_gen_len: int) -> None:
        params = self.model.params
        if not isinstance(prompt_tokens, (list, tuple)) or len(prompt_tokens) == 0:
            raise ValueError("no prompts given: pass a non-empty list of prompts")
        if len(prompt_tokens) > params.max_batch_size:
            raise ValueError(
                f"{len(prompt_tokens)} prompts but max_batch_size is {params.max_batch_size}: "
                f"pass at most {params.max_batch_size} per call, or build with a larger max_batch_size"
            )
        for i, t in enumerate(prompt_tokens):
            if not isinstance(t, (list, tuple)) or len(t) == 0:
                raise ValueError(f"prompt {i} is empty: every prompt needs at least one token")
            if not all(isinstance(x, int) and 0 <= x < self.tokenizer.n_words for x in t):
                raise ValueError(f"prompt {i} holds values that are not token ids in [0, {self.tokenizer.n_words})")
            if len(t) > params.max_seq_len:
                raise ValueError(
                    f"prompt {i} is {len(t)} tokens, longer than max_seq_len={params.max_seq_len}: "
                    "shorten it, or build with a larger max_seq_len"
                )
        if not isinstance(max_gen_len, int) or max_gen_len < 0:
            raise ValueError(f"max_gen_len must be an int >= 0, got {max_gen_len!r}")

    def _sampler(self, temperature, top_p, top_k=0, repetition_penalty=1.0, seed=None) -> Sampler:
        generator = None
        if seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(int(seed))
        return Sampler(temperature, top_p, top_k, repetition_penalty, generator)

    def _start(self, prompt_tokens: List[List[int]], max_gen_len: int, logprobs: bool) -> _State:
        params = self.model.params
        bsz = len(prompt_tokens)
        min_prompt_len = min(len(t) for t in prompt_tokens)
        max_prompt_len = max(len(t) for t in prompt_tokens)
        total_len = min(params.max_seq_len, max_gen_len + max_prompt_len)

        pad_id = self.tokenizer.pad_id
        tokens = torch.full((bsz, total_len), pad_id, dtype=torch.long, device=self.device)
        for k, t in enumerate(prompt_tokens):
            tokens[k, : len(t)] = torch.tensor(t, dtype=torch.long, device=self.device)
        return _State(
            tokens=tokens,
            input_text_mask=tokens != pad_id,
            eos_reached=torch.zeros(bsz, dtype=torch.bool, device=self.device),
            token_logprobs=torch.zeros_like(tokens, dtype=torch.float) if logprobs else None,
            min_prompt_len=min_prompt_len,
            total_len=total_len,
        )

    def _logprobs(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        # logits (bs, seqlen, vocab) predict targets (bs, seqlen)
        return -F.cross_entropy(logits.transpose(1, 2), targets, reduction="none", ignore_index=self.tokenizer.pad_id)

    def _decode(self, s: _State, sampler: Sampler) -> Iterator[int]:
        """The reference's decode loop; yields each position once its token is in `s.tokens`."""
        prev_pos = 0
        all_logits = s.token_logprobs is not None
        if s.min_prompt_len == s.total_len and all_logits:
            # Nothing to generate: score the prompts in one pass (position 0, BOS, keeps 0).
            logits = self.decoder(s.tokens, 0, True)
            s.token_logprobs[:, 1:] = self._logprobs(logits[:, :-1], s.tokens[:, 1:])

        sync_every = self.decoder.sync_every
        for step, cur_pos in enumerate(range(s.min_prompt_len, s.total_len), start=1):
            logits = self.decoder(s.tokens[:, prev_pos:cur_pos], prev_pos, all_logits)
            token = sampler(logits[:, -1], s.tokens[:, :cur_pos])
            # positions still inside a longer prompt keep the prompt's token
            token = torch.where(s.input_text_mask[:, cur_pos], s.tokens[:, cur_pos], token)
            s.tokens[:, cur_pos] = token
            if s.token_logprobs is not None:
                s.token_logprobs[:, prev_pos + 1 : cur_pos + 1] = self._logprobs(
                    logits, s.tokens[:, prev_pos + 1 : cur_pos + 1]
                )
            s.eos_reached |= (~s.input_text_mask[:, cur_pos]) & (token == self.tokenizer.eos_id)
            prev_pos = cur_pos
            yield cur_pos
            if step % sync_every == 0 and bool(s.eos_reached.all()):  # a host sync: not every step on GPU
                break

    def _outputs(self, s: _State, prompt_tokens, max_gen_len: int, echo: bool):
        out_tokens, out_logprobs = [], []
        all_logprobs = s.token_logprobs.tolist() if s.token_logprobs is not None else None
        for i, toks in enumerate(s.tokens.tolist()):
            start = 0 if echo else len(prompt_tokens[i])
            end = len(prompt_tokens[i]) + max_gen_len
            toks = toks[start:end]
            probs = all_logprobs[i][start:end] if all_logprobs is not None else None
            # cut at EOS, or where decoding stopped early (a stop string): positions never filled
            ends = [toks.index(t) for t in (self.tokenizer.eos_id, self.tokenizer.pad_id) if t in toks]
            if ends:
                toks = toks[: min(ends)]
                probs = probs[: min(ends)] if probs is not None else None
            out_tokens.append(toks)
            out_logprobs.append(probs)
        return out_tokens, (out_logprobs if all_logprobs is not None else None)

    def _run(self, prompt_tokens, max_gen_len: int, sampler: Sampler, logprobs: bool, echo: bool,
             stops: Sequence[str] = ()):
        """Decodes a batch; with stop strings, each row also ends at its first stop string.

        Returns (texts, tokens, logprobs): texts cut before any stop string, tokens (and
        their logprobs) those whose text lies wholly before it.
        """
        self._check_request(prompt_tokens, max_gen_len)
        state = self._start(prompt_tokens, max_gen_len, logprobs)
        streams = [TextStream(self.tokenizer, stops) for _ in prompt_tokens] if stops else []
        for cur_pos in self._decode(state, sampler):
            for i, stream in enumerate(streams):  # host syncs, only when stop strings are asked for
                if len(prompt_tokens[i]) <= cur_pos and not stream.stopped:
                    stream.add(int(state.tokens[i, cur_pos]))
                    if stream.stopped:
                        state.eos_reached[i] = True
        tokens, lps = self._outputs(state, prompt_tokens, max_gen_len, echo)
        texts = []
        for i, toks in enumerate(tokens):
            text = self.tokenizer.decode(toks)
            base = len(self.tokenizer.decode(toks[: len(prompt_tokens[i])])) if echo else 0
            cut = find_stop(text[base:], stops) if stops else None
            if cut is not None:
                text = text[: base + cut]
                keep = len(prompt_tokens[i]) if echo else 0
                while keep < len(toks) and len(self.tokenizer.decode(toks[: keep + 1])) <= len(text):
                    keep += 1
                tokens[i] = toks[:keep]
                if lps is not None:
                    lps[i] = lps[i][:keep]
            texts.append(text)
        return texts, tokens, lps

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
        sampler = self._sampler(temperature, top_p, top_k, repetition_penalty, seed)
        _, tokens, lps = self._run(prompt_tokens, max_gen_len, sampler, logprobs, echo)
        return tokens, lps

    # -- text and chat ----------------------------------------------------------------------------

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

    def _default_gen_len(self, max_gen_len: Optional[int]) -> int:
        return self.model.params.max_seq_len - 1 if max_gen_len is None else max_gen_len

    @torch.inference_mode()
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
        stops = validate_stop(stop)
        sampler = self._sampler(temperature, top_p, top_k, repetition_penalty, seed)
        prompt_tokens = self._encode_prompts(prompts)
        texts, tokens, lps = self._run(prompt_tokens, self._default_gen_len(max_gen_len), sampler, logprobs, echo, stops)
        if logprobs:
            return [
                {"generation": text, "tokens": [self.tokenizer.decode([x]) for x in t], "logprobs": lp}
                for text, t, lp in zip(texts, tokens, lps)
            ]
        return [{"generation": text} for text in texts]

    @torch.inference_mode()
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
        stops = validate_stop(stop)
        sampler = self._sampler(temperature, top_p, top_k, repetition_penalty, seed)
        prompt_tokens = self._encode_dialogs(dialogs)
        unsafe = [has_special_tags(d) for d in dialogs]
        texts, tokens, lps = self._run(prompt_tokens, self._default_gen_len(max_gen_len), sampler, logprobs, False, stops)

        def message(text, bad):
            return {"role": "assistant", "content": UNSAFE_ERROR if bad else text}

        if logprobs:
            return [
                {"generation": message(text, bad), "tokens": [self.tokenizer.decode([x]) for x in t], "logprobs": lp}
                for text, t, lp, bad in zip(texts, tokens, lps, unsafe)
            ]
        return [{"generation": message(text, bad)} for text, bad in zip(texts, unsafe)]

    # -- streaming --------------------------------------------------------------------------------

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
        stops = validate_stop(stop)
        sampler = self._sampler(temperature, top_p, top_k, repetition_penalty, seed)
        return self._stream(self._encode_prompts([prompt])[0], self._default_gen_len(max_gen_len), sampler, stops)

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
        stops = validate_stop(stop)
        sampler = self._sampler(temperature, top_p, top_k, repetition_penalty, seed)
        prompt = self._encode_dialogs([dialog])[0]
        if has_special_tags(dialog):
            return iter([UNSAFE_ERROR])
        return self._stream(prompt, self._default_gen_len(max_gen_len), sampler, stops)

    def _stream(self, prompt: List[int], max_gen_len: int, sampler: Sampler, stops) -> Iterator[str]:
        self._check_request([prompt], max_gen_len)  # here, so bad input fails at the call
        with torch.inference_mode():
            state = self._start([prompt], max_gen_len, logprobs=False)
        return self._pieces(state, self._decode(state, sampler), TextStream(self.tokenizer, stops))

    def _pieces(self, state: _State, steps: Iterator[int], text: TextStream) -> Iterator[str]:
        while True:
            with torch.inference_mode():  # only while computing, not while the caller holds a piece
                cur_pos = next(steps, None)
                token = None if cur_pos is None else int(state.tokens[0, cur_pos])
            if token is None or token == self.tokenizer.eos_id:
                break
            piece = text.add(token)
            if piece:
                yield piece
            if text.stopped:
                break
        rest = text.finish()
        if rest:
            yield rest
