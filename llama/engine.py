"""The serving engine: one thread runs the model over a batch that requests join and leave.

Each cache row of the model is a slot. A submitted `Request` waits in a bounded queue
until a slot is free; then its prompt is prefilled into that slot's row (the requests
admitted together in one forward), and from the next decode step on it decodes with every
other running request, one token a step, each at its own position and with its own
sampling options, stop strings and length (continuous batching: at most one prefill runs
between two decode steps). A request leaves at EOS, a stop string, its length, or when
cancelled; its slot is free for the next one from the following step.

The host never waits for the device between steps: each step's tokens are chosen on the
device, where the next step reads them, and while a step runs the engine takes in the one
before it (text, stop strings, outputs). A request that ends at a step (EOS, a stop string)
has its row computed once more in the step already launched; that result is dropped. A
request whose sampler reads its history (a repetition penalty) makes the engine take each
step in before launching the next.

Answers are those of `Llama.generate` and friends: the same samplers (`llama.sampling`),
a request's own `torch.Generator` when seeded, stop strings and text pieces from
`llama.streaming.TextStream`. Outputs go to the request's callback (called in the
engine's thread) or queue in its `Handle`. With several processes, the steps run in
lockstep on every rank (`llama.lockstep`); the engine lives on rank 0.
"""

import queue
import sys
import threading
import traceback
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Deque, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from llama.decoding import check_prompts
from llama.lockstep import Lockstep
from llama.options import Options
from llama.streaming import TextStream

MAX_TOP_LOGPROBS = 20
SWITCH_INTERVAL = 0.0005  # seconds; see Engine.start
PREFILL_TOKENS = 4096  # prompt tokens prefilled together at most (a longer prompt goes alone)
# Sampling values this close to 0 (the penalty: or beyond its inverse) overflow float32 logits
# into NaN probabilities, which on CUDA end in a device-side assert: the engine refuses them.
SANE = 1e-6
STOP, LENGTH, CANCELLED, ERROR = "stop", "length", "cancelled", "error"


class QueueFull(RuntimeError):
    """Every slot is busy and the waiting queue is full: try again later."""


@dataclass(frozen=True)
class Request:
    """One prompt to complete.

    Attributes:
        prompt: token ids, BOS first (as `Tokenizer.encode(..., bos=True)` gives them).
        options: sampling, max_gen_len (None: up to max_seq_len), stop strings, logprobs and
            echo, as `Llama.generate` takes them. With echo, the prompt's tokens after the
            first (BOS) come back before the answer's.
        top_logprobs: with options.logprobs, also the k most likely tokens of each position.
        on_output: called in the engine's thread with each `Output` (None: kept by the handle).
    """

    prompt: Sequence[int]
    options: Options = field(default_factory=Options)
    top_logprobs: int = 0
    on_output: Optional[Callable[["Output"], None]] = None


@dataclass
class Output:
    """What one step added to a request's answer; the last one has a `finish_reason`.

    `tokens` are those whose text is now wholly out (a token cut by a stop string never is),
    with their log-probabilities, top alternatives ((id, logprob) pairs) and the offset in
    the answer's text where each one's text begins, when logprobs were asked for.
    """

    text: str = ""
    tokens: List[int] = field(default_factory=list)
    logprobs: Optional[List[float]] = None
    top_logprobs: Optional[List[List[Tuple[int, float]]]] = None
    offsets: List[int] = field(default_factory=list)
    finish_reason: Optional[str] = None  # 'stop' (EOS or a stop string), 'length', 'cancelled', 'error'
    prompt_tokens: int = 0  # on the last output
    completion_tokens: int = 0  # on the last output: tokens generated (EOS not counted)
    error: Optional[str] = None


@dataclass
class Result:
    """A request's outputs joined: the whole answer."""

    text: str = ""
    tokens: List[int] = field(default_factory=list)
    logprobs: Optional[List[float]] = None
    top_logprobs: Optional[List[List[Tuple[int, float]]]] = None
    offsets: List[int] = field(default_factory=list)
    finish_reason: Optional[str] = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: Optional[str] = None

    def add(self, out: Output) -> "Result":
        self.text += out.text
        self.tokens += out.tokens
        self.offsets += out.offsets
        if out.logprobs is not None:
            self.logprobs = (self.logprobs or []) + out.logprobs
        if out.top_logprobs is not None:
            self.top_logprobs = (self.top_logprobs or []) + out.top_logprobs
        if out.finish_reason is not None:
            self.finish_reason, self.error = out.finish_reason, out.error
            self.prompt_tokens, self.completion_tokens = out.prompt_tokens, out.completion_tokens
        return self


class Handle:
    """A submitted request: cancel it, or read its outputs (when it has no callback)."""

    def __init__(self, request: Request, engine: "Engine"):
        self.request = request
        self.cancelled = False
        self.finished = threading.Event()
        self._engine = engine
        self._outputs: Optional[queue.SimpleQueue] = queue.SimpleQueue() if request.on_output is None else None

    def cancel(self) -> None:
        """Stops the request: its slot is free from the next step on (no-op once finished)."""
        self._engine._cancel(self)

    def __iter__(self) -> Iterator[Output]:
        """Each output as it comes, the last one included (requests without a callback)."""
        if self._outputs is None:
            raise RuntimeError("this request's outputs go to its on_output callback")
        while True:
            out = self._outputs.get()
            yield out
            if out.finish_reason is not None:
                return

    def result(self) -> Result:
        """Waits for the whole answer."""
        res = Result()
        for out in self:
            res.add(out)
        return res

    def _put(self, out: Output) -> None:
        if out.finish_reason is not None:
            self.finished.set()
        if self._outputs is not None:
            self._outputs.put(out)
            return
        try:
            self.request.on_output(out)
        except Exception:  # a reader that has gone away (a closed event loop): stop its request
            self.cancelled = True


class _Running:
    """A request in a slot: what it generated and what of that is out."""

    def __init__(self, handle: Handle, row: int, max_seq_len: int, tokenizer, device: torch.device):
        req = handle.request
        self.handle, self.row, self.device = handle, row, device
        self.prompt = list(req.prompt)
        self.options = req.options
        self.limit = min(self.options.gen_len(max_seq_len), max_seq_len - len(self.prompt))
        self.sampler = self.options.sampler(device)
        self.top = req.top_logprobs if self.options.logprobs else 0
        self.generated: List[int] = []
        self.logprobs: List[float] = []
        self.tops: List[List[Tuple[int, float]]] = []
        self.stream = TextStream(tokenizer, self.options.stop, after=self.prompt if self.options.echo else ())
        self.base = len(tokenizer.decode(self.prompt)) if self.options.echo else 0  # offsets start after the echo
        self.sent = 0  # generated tokens already in outputs
        self.launched = 0  # tokens chosen on the device (the generated ones and those on their way)
        self.needs_history = self.sampler.repetition_penalty != 1.0

    @property
    def batch_key(self):
        """Requests with equal keys are sampled together; None: alone (own RNG, or a penalty
        that reads its own history)."""
        s = self.sampler
        if self.needs_history:
            return None
        if s.temperature == 0:
            return ("greedy",)
        return None if s.generator is not None else (s.temperature, s.top_p, s.top_k)

    def history(self) -> torch.Tensor:
        return torch.tensor([self.prompt + self.generated], dtype=torch.long, device=self.device)


class Engine:
    """Continuous batching over a `Llama`'s model, in a thread of its own.

    While running, the engine holds the Llama (`Llama.exclusive`): its own calls wait.

    Args:
        llama: a built `Llama` (any decoder; CUDA graphs of a fast one are used).
        max_queue: requests that may wait for a slot; past that, `submit` raises `QueueFull`.
    """

    def __init__(self, llama, max_queue: int = 64):
        if not isinstance(max_queue, int) or max_queue < 0:
            raise ValueError(f"max_queue must be an int >= 0, got {max_queue!r}")
        params = llama.model.params
        self.llama = llama
        self.tokenizer = llama.tokenizer
        self.max_seq_len, self.max_batch_size = params.max_seq_len, params.max_batch_size
        self.max_queue = max_queue
        self.lockstep = Lockstep(llama.model, llama.decoder)
        self.device = self.lockstep.device
        self._slots: List[Optional[_Running]] = [None] * self.max_batch_size
        self._next = torch.zeros(self.max_batch_size, dtype=torch.long, device=self.device)  # each row's next input
        self._inflight: List[_Launched] = []  # launched steps not yet taken in
        self._waiting: Deque[Handle] = deque()
        self._count = 0  # waiting + running
        self._cond = threading.Condition()
        self._closing = False
        self._ready = threading.Event()
        self._thread: Optional[threading.Thread] = None

    # --- public API, any thread ---

    def start(self) -> "Engine":
        """Starts the decode thread; returns once it holds the model and can serve."""
        if self._thread is not None:
            raise RuntimeError("the engine has been started already")
        # After each wait for the device this thread needs Python's lock back at once, or the
        # device idles while another thread (an HTTP server's) holds it for up to the switch
        # interval (5 ms by default, as long as a decode step).
        sys.setswitchinterval(min(sys.getswitchinterval(), SWITCH_INTERVAL))
        self._thread = threading.Thread(target=self._main, name="llama-engine", daemon=True)
        self._thread.start()
        while not self._ready.wait(0.1):
            if not self._thread.is_alive():
                raise RuntimeError("the engine's thread ended before it could serve (see the error above)")
        return self

    def stop(self) -> None:
        """Cancels every request and ends the decode thread (and the other ranks' `follow`)."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()

    def __enter__(self) -> "Engine":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def ready(self) -> bool:
        """True while the engine can take requests."""
        return self._ready.is_set() and not self._closing and self._thread is not None and self._thread.is_alive()

    def submit(self, request: Request) -> Handle:
        """Queues one request; see `submit_many`."""
        return self.submit_many([request])[0]

    def submit_many(self, requests: Sequence[Request]) -> List[Handle]:
        """Queues requests, all or none.

        Raises:
            ValueError: a prompt is empty, holds non-token ids or is longer than max_seq_len;
                top_logprobs, temperature or repetition_penalty is out of range.
            QueueFull: they do not fit beside the running and waiting ones.
            RuntimeError: the engine is not running.
        """
        for r in requests:
            check_prompts([list(r.prompt)], r.options.gen_len(self.max_seq_len), self.tokenizer.n_words, 1,
                          self.max_seq_len)
            if not isinstance(r.top_logprobs, int) or not 0 <= r.top_logprobs <= MAX_TOP_LOGPROBS:
                raise ValueError(f"top_logprobs must be an int in [0, {MAX_TOP_LOGPROBS}], got {r.top_logprobs!r}")
            if 0 < r.options.temperature < SANE:
                raise ValueError(f"temperature must be 0 (greedy) or at least {SANE}, got {r.options.temperature!r}")
            if not SANE <= r.options.repetition_penalty <= 1 / SANE:
                raise ValueError(f"repetition_penalty must be in [{SANE}, {1 / SANE:.0f}], got "
                                 f"{r.options.repetition_penalty!r}")
        handles = [Handle(r, self) for r in requests]
        with self._cond:
            if not self.ready:
                raise RuntimeError("the engine is not running")
            if self._count + len(handles) > self.max_batch_size + self.max_queue:
                raise QueueFull(f"all {self.max_batch_size} slots are busy and {len(self._waiting)} requests wait "
                                f"(at most {self.max_queue}); try again shortly")
            self._waiting.extend(handles)
            self._count += len(handles)
            self._cond.notify_all()
        return handles

    def stats(self) -> Dict[str, int]:
        """{'running': requests in slots, 'waiting': requests queued, 'free': free slots}."""
        with self._cond:
            running = sum(s is not None for s in self._slots)
            return {"running": running, "waiting": len(self._waiting), "free": self.max_batch_size - running}

    # --- inside: `_cancel` from any thread, the rest in the decode thread ---

    def _cancel(self, handle: Handle) -> None:
        with self._cond:
            if handle.finished.is_set() or handle.cancelled:
                return
            handle.cancelled = True
            waiting = handle in self._waiting
            if waiting:
                self._waiting.remove(handle)
                self._count -= 1
            self._cond.notify_all()
        if waiting:
            handle._put(Output(finish_reason=CANCELLED, prompt_tokens=len(handle.request.prompt)))

    def _main(self) -> None:
        with self.llama.exclusive(), torch.inference_mode():
            try:
                self.lockstep.prepare()
                self._ready.set()
                while self._step():
                    pass
            finally:
                self._closing = True
                self._end_all()
                self.lockstep.close()

    def _step(self) -> bool:
        """One turn: admit the waiting requests that fit (one prefill for them all), launch a
        decode step for every running request, then take in the step before it (whose tokens
        are ready by now) while this one runs on the device."""
        with self._cond:
            while not self._closing and not self._waiting and not any(self._slots) and not self._inflight:
                self._cond.wait()
            if self._closing:
                return False
            new = self._admit()
        try:
            for run in self._slots:
                if run is not None and run.handle.cancelled:
                    self._finish(run, CANCELLED)
            new = [r for r in new if self._slots[r.row] is r]  # (not cancelled meanwhile)
            self._inflight += self._prefill(new) if new else []
            if any(r.needs_history for r in self._slots if r is not None):
                self._take_all()  # its sampler reads every token so far: none may be on its way
            earlier, self._inflight = self._inflight, []
            step = self._launch_decode()
            if step is not None:
                self._inflight.append(step)
            for launched in earlier:  # while the step runs
                self._take(launched)
        except Exception as e:  # the model failed: fail the running requests, keep serving
            traceback.print_exc(file=sys.stderr)
            self._inflight = []
            for run in self._slots:
                if run is not None:
                    self._finish(run, ERROR, error=f"{type(e).__name__}: {e}")
        return True

    def _admit(self) -> List[_Running]:
        """Waiting requests, first come first served, into the lowest free slots (so decode
        batches stay compact), as many as fit and whose prompts add up to at most
        PREFILL_TOKENS (at least one)."""
        admitted: List[_Running] = []
        tokens = 0
        while self._waiting and not all(self._slots):
            n = len(self._waiting[0].request.prompt)
            if admitted and tokens + n > PREFILL_TOKENS:
                break
            handle = self._waiting.popleft()
            row = self._slots.index(None)
            try:
                run = _Running(handle, row, self.max_seq_len, self.tokenizer, self.device)
            except Exception as e:  # (options are checked on submission; this is a last guard for the thread)
                self._count -= 1
                handle._put(Output(finish_reason=ERROR, error=f"{type(e).__name__}: {e}"))
                continue
            self._slots[row] = run
            admitted.append(run)
            tokens += n
        return admitted

    def _prefill(self, runs: List[_Running]) -> List["_Launched"]:
        """Prefills `runs` (those asking for the prompt's logprobs alone, the rest together) and
        launches the sampling of their first tokens."""
        launched = []
        together = []
        for run in runs:
            opts = run.options
            scored = opts.echo and opts.logprobs
            if run.limit == 0 and not scored:
                if opts.echo:
                    self._echo(run, None)
                self._finish(run, LENGTH)
            elif scored:
                logits = self.lockstep.prefill([run.row], [run.prompt], all_logits=True)
                self._echo(run, logits[:-1])
                if run.limit == 0:
                    self._finish(run, LENGTH)
                else:
                    launched.append(self._launch_sampling([run], logits[-1:]))
            else:
                if opts.echo:
                    self._echo(run, None)
                together.append(run)
        if together:
            logits = self.lockstep.prefill([r.row for r in together], [r.prompt for r in together])
            launched.append(self._launch_sampling(together, logits))
        return launched

    def _launch_decode(self) -> Optional["_Launched"]:
        """Launches one decode step for every running request with tokens left to generate."""
        runs = [r for r in self._slots if r is not None and 0 < r.launched < r.limit]
        if not runs:
            return None
        bs = max(r.row for r in runs) + 1
        positions = [0] * bs  # rows without a request: position 0 of their own (free) cache row
        for r in runs:
            positions[r.row] = len(r.prompt) + r.launched - 1
        logits = self.lockstep.decode(self._next[:bs], positions)
        rows = [r.row for r in runs]
        return self._launch_sampling(runs, logits if rows == list(range(bs)) else logits[self._upload(rows)])

    def _launch_sampling(self, runs: List[_Running], logits: torch.Tensor) -> "_Launched":
        """Launches the choice of each run's next token from its row of `logits` (len(runs),
        vocab) and the copy of the tokens (and logprobs) to the host; each run's next step
        reads its token on the device."""
        picks = torch.empty(len(runs), dtype=torch.long, device=logits.device)
        groups: Dict[object, List[int]] = {}
        for j, run in enumerate(runs):
            key = run.batch_key
            if key is None:
                history = run.history() if run.needs_history else None
                picks[j] = run.sampler(logits[j : j + 1], history)[0]
            else:
                groups.setdefault(key, []).append(j)
        for js in groups.values():
            if len(js) == len(runs):
                picks = runs[js[0]].sampler(logits, None)
            else:
                idx = self._upload(js)
                picks[idx] = runs[js[0]].sampler(logits[idx], None)
        self._next[self._upload([r.row for r in runs])] = picks
        want = [j for j, run in enumerate(runs) if run.options.logprobs]
        scores = None
        if want:
            idx = self._upload(want)
            scores = _logprobs(logits[idx], picks[idx], max(runs[j].top for j in want))
        for run in runs:
            run.launched += 1
        return _Launched(runs, want, _to_host(picks), None if scores is None else tuple(map(_to_host, scores)),
                         _ready_event(logits.device))

    def _upload(self, values: List[int]) -> torch.Tensor:
        """Indices on the device, without waiting for the steps already launched."""
        return self.lockstep.upload(values)

    def _take_all(self) -> None:
        """Takes in every launched step, oldest first."""
        inflight, self._inflight = self._inflight, []
        for step in inflight:
            self._take(step)

    def _take(self, step: "_Launched") -> None:
        """Adds a launched step's tokens to its runs (those still running): text, stop strings,
        lengths, outputs."""
        if step.ready is not None:
            step.ready.synchronize()
        picks = step.picks.tolist()
        lps: List[Optional[float]] = [None] * len(step.runs)
        tops: List[Optional[list]] = [None] * len(step.runs)
        if step.scores is not None:
            chosen, values, ids = (t.tolist() for t in step.scores)
            for n, j in enumerate(step.want):
                lps[j] = chosen[n]
                k = step.runs[j].top
                tops[j] = list(zip(ids[n][:k], values[n][:k]))
        eos = self.tokenizer.eos_id
        for run, token, lp, top in zip(step.runs, picks, lps, tops):
            if self._slots[run.row] is not run:  # it ended while this step ran
                continue
            if token == eos:
                self._finish(run, STOP)
                continue
            run.generated.append(token)
            if lp is not None:
                run.logprobs.append(lp)
                run.tops.append(top)
            piece = run.stream.add(token)
            if run.stream.stopped:
                self._finish(run, STOP, piece)
            elif len(run.generated) >= run.limit:
                self._finish(run, LENGTH, piece)
            else:
                out = self._output(run, piece)
                if out.text or out.tokens:
                    run.handle._put(out)

    def _echo(self, run: _Running, logits: Optional[torch.Tensor]) -> None:
        """The prompt's text and tokens after BOS (with logprobs from the prefill's `logits`)."""
        shown = run.prompt[1:]
        out = Output(text=self.tokenizer.decode(run.prompt), tokens=shown)
        if logits is not None:
            targets = torch.tensor(shown, dtype=torch.long, device=logits.device)
            chosen, values, ids = (t.tolist() for t in _logprobs(logits, targets, run.top))
            out.logprobs = chosen
            out.top_logprobs = [list(zip(i, v)) for i, v in zip(ids, values)]
            stream = TextStream(self.tokenizer)
            for t in shown:
                stream.add(t)
            stream.finish()
            out.offsets = ([0] + stream.ends[:-1])[: len(shown)]
        run.handle._put(out)

    def _output(self, run: _Running, text: str, upto: Optional[int] = None) -> Output:
        """`text` and the generated tokens now wholly out (up to `upto`, else those whose text
        ends within what has been sent), as the next output."""
        ends, start = run.stream.ends, run.sent
        if upto is None:
            upto = start
            while upto < len(ends) and ends[upto] <= run.stream.emitted:
                upto += 1
        out = Output(text=text, tokens=run.generated[start:upto])
        if run.options.logprobs:
            out.logprobs = run.logprobs[start:upto]
            out.top_logprobs = run.tops[start:upto]
            out.offsets = [run.base + (ends[j - 1] if j else 0) for j in range(start, upto)]
        run.sent = upto
        return out

    def _finish(self, run: _Running, reason: str, text: str = "", error: Optional[str] = None) -> None:
        """Sends the last output (`text`, then the rest of the stream) and frees the slot."""
        if reason in (STOP, LENGTH):
            text += run.stream.finish()
            out = self._output(run, text, run.stream.tokens_before_stop())
        else:
            out = Output()
        out.finish_reason, out.error = reason, error
        out.prompt_tokens, out.completion_tokens = len(run.prompt), len(run.generated)
        with self._cond:
            self._slots[run.row] = None
            self._count -= 1
        run.handle._put(out)

    def _end_all(self) -> None:
        """At shutdown: every running and waiting request ends as cancelled."""
        for run in self._slots:
            if run is not None:
                self._finish(run, CANCELLED)
        with self._cond:
            waiting, self._waiting = list(self._waiting), deque()
            self._count -= len(waiting)
        for handle in waiting:
            handle._put(Output(finish_reason=CANCELLED, prompt_tokens=len(handle.request.prompt)))


def _logprobs(logits: torch.Tensor, targets: torch.Tensor, k: int):
    """(log-probabilities of `targets` (n,) under `logits` (n, vocab), the k largest of each row,
    their ids), on the logits' device."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    chosen = lp.gather(1, targets[:, None])[:, 0]
    values, ids = lp.topk(k, dim=-1) if k else (lp[:, :0], targets[:, None][:, :0])
    return chosen, values, ids


def _to_host(t: torch.Tensor) -> torch.Tensor:
    """`t` on the host; from CUDA, an asynchronous copy (read it after the step's event)."""
    return t.to("cpu", non_blocking=True) if t.is_cuda else t


def _ready_event(device: torch.device):
    """An event recorded after the launched work, or None off CUDA (where it is done already)."""
    if device.type != "cuda":
        return None
    event = torch.cuda.Event()
    event.record()
    return event


@dataclass
class _Launched:
    """A step whose tokens are being chosen on the device: its runs, which of them asked for
    logprobs, and the host copies of the tokens and (logprob, top values, top ids)."""

    runs: List[_Running]
    want: List[int]
    picks: torch.Tensor
    scores: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    ready: Optional["torch.cuda.Event"]
