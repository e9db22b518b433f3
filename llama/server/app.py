"""The HTTP layer: OpenAI's API as FastAPI routes over an `Engine`.

Each route checks its body (`llama.server.schema`), turns it into engine requests, and
returns the results as OpenAI's objects (`llama.server.objects`): whole, or streamed as
server-sent events ending with `data: [DONE]`. Every error is OpenAI's error object; a
client that goes away cancels its requests, which frees their slots.
"""

import asyncio
import dataclasses
import hmac
import json
import threading
import time
import weakref
from typing import AsyncIterator, Callable, List, Optional, Tuple

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.sse import EventSourceResponse, format_sse_event
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException

from llama.chat_format import UNSAFE_ERROR, encode_dialog, has_special_tags
from llama.engine import Engine, QueueFull, Result
from llama.engine import Request as Job
from llama.options import Options
from llama.server import objects
from llama.server.schema import ChatMessage, ChatRequest, CompletionRequest, Sampling

TEMPERATURE, TOP_P = 0.6, 0.9  # Llama's defaults (OpenAI's are 1 and 1)
COMPLETION_MAX_TOKENS = 16  # OpenAI's default for completions; chat answers run to max_seq_len
MAX_BODY_BYTES = 1 << 20
Parts = AsyncIterator[Tuple[int, Result]]


class APIError(Exception):
    """An error answered as OpenAI's error object."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 type: str = "invalid_request_error", headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.body, self.headers = status, objects.error(message, type, param, code), headers

    def response(self) -> JSONResponse:
        return JSONResponse(self.body, self.status, headers=self.headers)


def bad(message: str, param: Optional[str] = None) -> APIError:
    return APIError(400, message, param)


class Inbox:
    """One HTTP request's outputs on the event loop, taken all that have come at once (lighter
    than an asyncio.Queue, item by item, when a step brings outputs for 64 requests)."""

    def __init__(self):
        self._items: list = []
        self._waiter: Optional[asyncio.Future] = None

    def put(self, item) -> None:
        """On the loop's thread."""
        self._items.append(item)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def take(self) -> list:
        """Everything put since the last take (waits for at least one)."""
        while not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        items, self._items = self._items, []
        return items


class Mailbox:
    """Hands outputs from the engine's thread to the event loop: what arrives while the loop
    has not yet taken the last delivery goes with it, so a decode step's outputs for many
    requests wake the loop once, not once each."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._lock = threading.Lock()
        self._items: list = []

    def post(self, inbox: Inbox, item) -> None:
        """From any thread: `item` into `inbox` on the loop."""
        with self._lock:
            self._items.append((inbox, item))
            first = len(self._items) == 1
        if first:
            try:
                self._loop.call_soon_threadsafe(self._deliver)
            except RuntimeError:  # the loop is closed: each poster hears it (and stops its request)
                with self._lock:
                    self._items.clear()
                raise

    def _deliver(self) -> None:
        with self._lock:
            items, self._items = self._items, []
        for inbox, item in items:
            inbox.put(item)


_MAILBOXES: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Mailbox]" = weakref.WeakKeyDictionary()


def mailbox() -> Mailbox:
    """The running event loop's mailbox."""
    loop = asyncio.get_running_loop()
    box = _MAILBOXES.get(loop)
    if box is None:
        box = _MAILBOXES[loop] = Mailbox(loop)
    return box


class Run:
    """One HTTP request's engine requests, their outputs arriving on the event loop."""

    def __init__(self, engine: Engine, jobs: List[Job]):
        box = mailbox()
        self._inbox = Inbox()

        def sink(i: int) -> Callable:
            return lambda out: box.post(self._inbox, (i, out))

        try:
            self.handles = engine.submit_many([dataclasses.replace(j, on_output=sink(i)) for i, j in enumerate(jobs)])
        except QueueFull as e:
            raise APIError(503, str(e), code="queue_full", type="server_error", headers={"Retry-After": "1"})
        except ValueError as e:  # its first word names the field
            raise bad(str(e), str(e).split()[0])
        except RuntimeError as e:  # the engine has stopped
            raise APIError(503, f"not serving: {e}", code="unavailable", type="server_error")

    def cancel(self) -> None:
        for h in self.handles:
            h.cancel()

    async def parts(self) -> Parts:
        """(request index, what it added) as outputs come; the outputs waiting together are joined."""
        open_ = len(self.handles)
        while open_:
            batch = await self._inbox.take()
            joined = {}
            for i, out in batch:
                joined.setdefault(i, Result()).add(out)
            for i, part in joined.items():
                if part.finish_reason is not None:
                    open_ -= 1
                yield i, part

    async def results(self, request: Request) -> List[Result]:
        """Every request's whole result; the requests are cancelled if the client goes away."""
        results = [Result() for _ in self.handles]
        watch = asyncio.ensure_future(self._cancel_on_disconnect(request))
        try:
            async for i, part in self.parts():
                results[i].add(part)
        finally:
            watch.cancel()
            self.cancel()
        failed = [r.error for r in results if r.finish_reason == "error"]
        if failed:
            raise APIError(500, f"generation failed: {failed[0]}", type="server_error")
        return results

    async def _cancel_on_disconnect(self, request: Request) -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        self.cancel()


async def answered(result: Result) -> Parts:
    yield 0, result


def sse(obj) -> bytes:
    data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)
    if not data.isascii():
        # Characters JSON leaves raw but Python's str.splitlines ends a line at: clients that
        # read a stream's lines with it (httpx's `aiter_lines`) would cut the event in two.
        # Escaped, the JSON means the same.
        data = data.replace("\x85", "\\u0085").replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")
    return format_sse_event(data_str=data)


class API:
    """The routes' logic over one engine and model name."""

    def __init__(self, engine: Engine, model_name: str):
        self.engine, self.model_name = engine, model_name
        self.tokenizer = engine.tokenizer
        self.created = int(time.time())

    async def health(self):
        if self.engine.ready:
            return {"status": "ok"}
        return JSONResponse({"status": "unavailable"}, 503)

    async def models(self):
        return {"object": "list", "data": [self.model_card()]}

    async def model(self, model: str):
        self.check_model(model)
        return self.model_card()

    def model_card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "llama"}

    def check_model(self, model: str) -> None:
        if model != self.model_name:
            raise APIError(404, f"the model {model!r} does not exist; this server serves {self.model_name!r}",
                           "model", "model_not_found")

    def check(self, body: Sampling) -> None:
        self.check_model(body.model)
        refused = body.unsupported()
        if refused is not None:
            raise bad(refused[1], refused[0])

    def options(self, body: Sampling, prompt: List[int], max_tokens: Optional[int], default_max: Optional[int],
                logprobs: bool, echo: bool = False, param: str = "prompt") -> Options:
        """The engine's options for one prompt; max_tokens None: `default_max`, or up to
        max_seq_len, as fits."""
        limit = self.engine.max_seq_len
        n = len(prompt)
        if n > limit:
            raise bad(f"the prompt is {n} tokens, longer than max_seq_len={limit}", param)
        if max_tokens is None:
            gen = limit - n if default_max is None else min(default_max, limit - n)
        elif n + max_tokens > limit:
            raise bad(f"the prompt ({n} tokens) and max_tokens ({max_tokens}) together are more than "
                      f"max_seq_len={limit} tokens", "max_tokens")
        else:
            gen = max_tokens
        try:
            return Options(TEMPERATURE if body.temperature is None else body.temperature,
                           TOP_P if body.top_p is None else body.top_p, gen, logprobs, echo, body.top_k or 0,
                           1.0 if body.repetition_penalty is None else body.repetition_penalty, body.stop, body.seed)
        except ValueError as e:
            raise bad(str(e), str(e).split()[0])

    def encode(self, text: str) -> List[int]:
        return self.tokenizer.encode(utf8(text, "prompt"), bos=True, eos=False)

    async def completions(self, body: CompletionRequest, request: Request):
        self.check(body)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not prompts:
            raise bad("prompt is an empty list: give a string or a non-empty list of strings", "prompt")
        tokens = [self.encode(p) for p in prompts]
        logprobs = body.logprobs is not None
        jobs = [Job(t, self.options(body, t, body.max_tokens, COMPLETION_MAX_TOKENS, logprobs, body.echo),
                    body.logprobs or 0) for t in tokens]
        run = Run(self.engine, jobs)
        reply = objects.Reply("completion", self.model_name)
        if body.stream:
            usage = body.stream_options is not None and body.stream_options.include_usage
            return EventSourceResponse(self.completion_events(reply, run, usage))
        return objects.completion(reply, await run.results(request), self.tokenizer)

    async def completion_events(self, reply: objects.Reply, run: Run, usage: bool):
        results = [Result() for _ in run.handles]
        try:
            async for i, part in run.parts():
                results[i].add(part)
                if part.finish_reason == "error":
                    yield sse(objects.error(f"generation failed: {part.error}", "server_error"))
                    break
                if part.text or part.tokens or part.finish_reason is not None:
                    yield sse(objects.completion_chunk(reply, i, part, self.tokenizer))
            if usage:
                yield sse(objects.usage_chunk(reply, "text_completion", results))
            yield sse("[DONE]")
        finally:
            run.cancel()

    async def chat(self, body: ChatRequest, request: Request):
        self.check(body)
        dialog = self.dialog(body.messages)
        try:
            prompt = encode_dialog(self.tokenizer, dialog)
        except ValueError as e:
            raise bad(str(e).replace("dialog", "messages", 1), "messages")
        max_tokens = body.max_tokens if body.max_tokens is not None else body.max_completion_tokens
        options = self.options(body, prompt, max_tokens, None, body.logprobs, param="messages")
        reply = objects.Reply("chat", self.model_name)
        usage = body.stream_options is not None and body.stream_options.include_usage
        if has_special_tags(dialog):  # answered as chat_completion answers it, without generating
            result = Result(UNSAFE_ERROR, finish_reason="stop", prompt_tokens=len(prompt))
            if body.stream:
                return EventSourceResponse(self.chat_events(reply, answered(result), lambda: None, usage))
            return objects.chat_completion(reply, result, self.tokenizer)
        run = Run(self.engine, [Job(prompt, options, body.top_logprobs or 0)])
        if body.stream:
            return EventSourceResponse(self.chat_events(reply, run.parts(), run.cancel, usage))
        return objects.chat_completion(reply, (await run.results(request))[0], self.tokenizer)

    async def chat_events(self, reply: objects.Reply, parts: Parts, cancel: Callable, usage: bool):
        result = Result()
        try:
            yield sse(objects.chat_chunk(reply, {"role": "assistant", "content": ""}, None, self.tokenizer))
            async for _, part in parts:
                result.add(part)
                if part.finish_reason == "error":
                    yield sse(objects.error(f"generation failed: {part.error}", "server_error"))
                    break
                if part.text or part.tokens:
                    yield sse(objects.chat_chunk(reply, {"content": part.text}, dataclasses.replace(
                        part, finish_reason=None), self.tokenizer))
                if part.finish_reason is not None:
                    yield sse(objects.chat_chunk(reply, {}, Result(finish_reason=part.finish_reason), self.tokenizer))
            if usage:
                yield sse(objects.usage_chunk(reply, "chat.completion.chunk", [result]))
            yield sse("[DONE]")
        finally:
            cancel()

    @staticmethod
    def dialog(messages: List[ChatMessage]) -> List[dict]:
        if not messages:
            raise bad("messages is empty: give at least one user message", "messages")
        dialog = []
        for i, m in enumerate(messages):
            content = m.content
            if not isinstance(content, str):
                if any(not isinstance(p, dict) or p.get("type") != "text" or not isinstance(p.get("text"), str)
                       for p in content):
                    raise bad(f"messages.{i}.content: only text parts ({{'type': 'text', 'text': ...}}) are "
                              "supported", "messages")
                content = "\n".join(p["text"] for p in content)
            dialog.append({"role": m.role, "content": utf8(content, "messages")})
        return dialog


def utf8(text: str, param: str) -> str:
    """`text`, if it is valid Unicode (JSON can carry lone surrogates, which no tokenizer takes)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise bad(f"{param} is not valid Unicode text: {e.reason} at character {e.start}", param)
    return text


UNIONS = {"prompt": "a string or a list of strings", "stop": "a string or a list of strings",
          "content": "a string or a list of text parts"}


def validation_error(exc: RequestValidationError) -> APIError:
    """A 400 naming the first problem pydantic or the JSON parser found in the body."""
    err = exc.errors()[0]
    kind = err.get("type", "")
    loc = [str(x) for x in err.get("loc", ()) if x != "body"]
    for i, part in enumerate(loc):  # a union's members are named in the path: say what the union takes
        if part in UNIONS and i + 1 < len(loc) and not loc[i + 1].isdigit():
            return bad(f"{'.'.join(loc[: i + 1])} must be {UNIONS[part]} (got {err.get('input')!r})", loc[0])
    if kind == "json_invalid":
        return bad(f"the body is not valid JSON: {err.get('ctx', {}).get('error', err.get('msg'))}")
    if not loc:
        return bad("the body must be a JSON object with the request's fields")
    path = ".".join(loc)
    if kind == "missing":
        return bad(f"missing required field {path!r}", loc[0])
    if kind == "extra_forbidden":
        return bad(f"unsupported field {path!r} (this server does not know it)", loc[0])
    return bad(f"invalid {path!r}: {err.get('msg')} (got {err.get('input')!r})", loc[0])


def http_error(exc: HTTPException) -> APIError:
    if exc.status_code == 413:
        return APIError(413, "the request body is too large for this server", code="request_too_large")
    if exc.status_code == 404:
        return APIError(404, "no such route; the API is under /v1 (models, completions, chat/completions)",
                        code="not_found")
    return APIError(exc.status_code, str(exc.detail))


class _App(FastAPI):
    """FastAPI, answering a body declared (Content-Length) larger than max_body_size with
    OpenAI's 413 before anything is read: FastAPI's own limit answers those in plain text.
    Bodies sent without a length are cut off by it, and answered by `http_error`."""

    def build_middleware_stack(self):
        inner, limit = super().build_middleware_stack(), self.max_body_size

        async def app(scope, receive, send):
            if scope["type"] == "http" and limit is not None:
                length = Headers(scope=scope).get("content-length", "")
                if length.isdigit() and int(length) > limit:
                    return await http_error(HTTPException(413)).response()(scope, receive, send)
            await inner(scope, receive, send)

        return app


def create_app(engine: Engine, model_name: str, api_key: Optional[str] = None,
               max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    """The OpenAI-compatible app over a started `engine`.

    Args:
        engine: the engine that answers.
        model_name: the id of the one model served (requests naming another get a 404).
        api_key: when set, every /v1 route needs `Authorization: Bearer <api_key>` (else 401).
        max_body_bytes: larger request bodies get a 413.

    Returns:
        The FastAPI app, to run with uvicorn (or any ASGI server).
    """
    api = API(engine, model_name)
    bearer = HTTPBearer(auto_error=False)

    async def authorize(credentials: Optional[HTTPAuthorizationCredentials] = Depends(bearer)) -> None:
        if api_key is None:
            return
        if credentials is None or not hmac.compare_digest(credentials.credentials.encode(), api_key.encode()):
            raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")

    app = _App(title="llama", max_body_size=max_body_bytes, openapi_url=None)
    app.add_exception_handler(APIError, lambda request, exc: exc.response())
    app.add_exception_handler(RequestValidationError, lambda request, exc: validation_error(exc).response())
    app.add_exception_handler(HTTPException, lambda request, exc: http_error(exc).response())
    app.add_exception_handler(Exception, lambda request, exc: APIError(
        500, f"internal error: {type(exc).__name__}: {exc}", type="server_error").response())

    auth = [Depends(authorize)]
    app.get("/health")(api.health)
    app.get("/v1/models", dependencies=auth)(api.models)
    app.get("/v1/models/{model:path}", dependencies=auth)(api.model)
    app.post("/v1/completions", dependencies=auth)(api.completions)
    app.post("/v1/chat/completions", dependencies=auth)(api.chat)
    return app
