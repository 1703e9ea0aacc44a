"""The HTTP side of `lmzoo serve`: OpenAI's chat and completions API over the engine.

Handlers parse and check a request, turn it into prompt tokens, submit one engine Request per
choice, and turn the engine's events (token, done) into OpenAI's JSON or server-sent events.
They never run the model: the engine thread does (lmzoo.serve.engine). Stop strings are matched
here, on text, so a stop string split across tokens still stops; streamed text that could be the
start of a stop string is held back until it is known not to be.

Every error is OpenAI's {"error": {"message", "type", "param", "code"}}, with 400 for a bad field,
401 for a missing or wrong key, 404 for an unknown model, 413 for a body too large, 503 while
loading or when the queue is full. Unknown fields are ignored.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import sys
import threading
import time
import uuid
from dataclasses import dataclass

from starlette.applications import Starlette
from starlette.requests import Request as HttpRequest
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..errors import LmzooError
from .engine import Request


@dataclass
class Limits:
    max_tokens: int = 2048  # per choice
    max_n: int = 8
    max_body_bytes: int = 1 << 20
    max_stop: int = 4


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.kind, "param": self.param,
                                       "code": self.code}}, status_code=self.status)


# ---------------------------------------------------------------------- field checks

def _field(body: dict, name: str, kinds, default=None, *, lo=None, hi=None):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        names = " or ".join(k.__name__.replace("str", "string").replace("int", "integer") for k in kinds)
        raise ApiError(400, f"'{name}' must be {names}, got {json.dumps(value)[:40]}", name)
    if value != value or lo is not None and value < lo or hi is not None and value > hi:  # NaN fails the first
        raise ApiError(400, f"'{name}' must be between {lo} and {hi}, got {value}", name)
    return value


def _stop_strings(body: dict, limits: Limits) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, "'stop' must be a non-empty string or a list of them", "stop")
    if len(stop) > limits.max_stop:
        raise ApiError(400, f"'stop' holds at most {limits.max_stop} strings, got {len(stop)}", "stop")
    return stop


def _unsupported(body: dict) -> None:
    fmt = body.get("response_format")
    if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
        raise ApiError(400, "'response_format' other than {\"type\": \"text\"} is not supported", "response_format")
    if body.get("tools"):
        raise ApiError(400, "'tools' (function calling) is not supported by lmzoo serve", "tools")
    if body.get("suffix"):
        raise ApiError(400, "'suffix' is not supported", "suffix")


def _messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant"):
            raise ApiError(400, f"messages[{i}]: needs a role of system, user or assistant", "messages")
        content = m.get("content")
        if isinstance(content, list):
            parts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ApiError(400, f"messages[{i}].content: only text parts are supported", "messages")
                parts.append(part["text"])
            content = "".join(parts)
        if not isinstance(content, str):
            raise ApiError(400, f"messages[{i}].content must be a string or a list of text parts", "messages")
        out.append({"role": "system" if m["role"] == "developer" else m["role"], "content": content})
    return out


# ---------------------------------------------------------------------- text out

class TextOut:
    """Token ids -> text, with stop strings matched on the text (across token boundaries)."""

    def __init__(self, tokenizer, stop: list[str]):
        self.decoder = tokenizer.stream_decoder(skip_special_tokens=True)
        self.stop, self.hold = stop, max((len(s) for s in stop), default=1) - 1
        self.text, self.sent, self.stopped = "", 0, False

    def put(self, token: int) -> str:
        """Add a token; return the text that may be sent now."""
        self.text += self.decoder.put(token)
        return self._release(final=False)

    def finish(self) -> str:
        if not self.stopped:
            self.text += self.decoder.flush()
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if not self.stopped and self.stop:
            hits = [i for i in (self.text.find(s) for s in self.stop) if i >= 0]
            if hits:
                self.text, self.stopped = self.text[:min(hits)], True
        end = len(self.text) if final or self.stopped else max(self.sent, len(self.text) - self.hold)
        piece, self.sent = self.text[self.sent:end], end
        return piece


# ---------------------------------------------------------------------- the app

class Server:
    """The state the handlers share: the engine and tokenizer once loaded, the key, the limits."""

    def __init__(self, load, *, api_key: str | None = None, limits: Limits | None = None, metrics=None):
        self.engine = self.tokenizer = None
        self.error: str | None = None
        self.api_key, self.limits, self.metrics = api_key, limits or Limits(), metrics
        self.created = int(time.time())
        threading.Thread(target=self._load, args=(load,), name="lmzoo-load", daemon=True).start()

    def _load(self, load) -> None:
        try:
            self.engine, self.tokenizer = load()
        except LmzooError as e:
            self.error = str(e)
        except Exception as e:  # out of memory, a failed compile...: /health must say so, not "loading" forever
            self.error = f"loading the model failed: {type(e).__name__}: {e}"
        if self.error:
            print(f"lmzoo serve: {self.error}", file=sys.stderr, flush=True)

    # ------------------------------------------------------------------ plumbing
    def _ready(self):
        if self.engine is None:
            raise ApiError(503, self.error or "the model is still loading; retry in a moment", kind="server_error",
                           code="loading")

    def _check_key(self, request: HttpRequest) -> None:
        if self.api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not given.startswith("Bearer ") or not hmac.compare_digest(given[7:].encode(), self.api_key.encode()):
            raise ApiError(401, "a missing or wrong API key: send 'Authorization: Bearer KEY'",
                           kind="authentication_error", code="invalid_api_key")

    async def _body(self, request: HttpRequest) -> dict:
        size = int(request.headers.get("content-length") or 0)
        if size > self.limits.max_body_bytes:
            raise ApiError(413, f"the body is {size} bytes; the limit is {self.limits.max_body_bytes}")
        chunks, total = [], 0
        async for chunk in request.stream():
            total += len(chunk)
            if total > self.limits.max_body_bytes:
                raise ApiError(413, f"the body is over the limit of {self.limits.max_body_bytes} bytes")
            chunks.append(chunk)
        try:
            body = json.loads(b"".join(chunks) or b"null")
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object")
        return body

    def _model(self, body: dict, required: bool = True) -> str:
        name = body.get("model")
        if name is None and not required:
            return self.engine.names()[0]
        if not isinstance(name, str):
            raise ApiError(400, "'model' must be a string: the base model or an adapter (GET /v1/models)", "model")
        if name not in self.engine.names():
            raise ApiError(404, f"unknown model {name!r}; this server has: {', '.join(self.engine.names())}",
                           "model", "model_not_found")
        return name

    def _sampling(self, body: dict, prompt_len: int, model: str, max_name: str) -> dict:
        context = self.engine.context_of(model)
        if prompt_len == 0:
            raise ApiError(400, "the prompt has no tokens", "messages" if max_name == "max_completion_tokens" else
                           "prompt")
        if prompt_len >= context:
            raise ApiError(400, f"the prompt has {prompt_len} tokens; this model's context is {context}",
                           "messages" if max_name == "max_completion_tokens" else "prompt",
                           "context_length_exceeded")
        room = min(context - prompt_len, self.limits.max_tokens)
        default = room if max_name == "max_completion_tokens" else min(16, room)
        names = ("max_completion_tokens", "max_tokens") if max_name == "max_completion_tokens" else ("max_tokens",)
        max_tokens = None
        for name in names:
            max_tokens = _field(body, name, (int,), None, lo=0 if max_name == "max_tokens" else 1,
                                hi=self.limits.max_tokens)
            if max_tokens is not None:
                if prompt_len + max_tokens > context:
                    raise ApiError(400, f"'{name}' {max_tokens} + the prompt's {prompt_len} tokens exceed the "
                                        f"context of {context}", name, "context_length_exceeded")
                break
        top_k = _field(body, "top_k", (int,), None, lo=-1)
        return dict(max_tokens=default if max_tokens is None else max_tokens,
                    temperature=float(_field(body, "temperature", (int, float), 1.0, lo=0, hi=2)),
                    top_p=float(_field(body, "top_p", (int, float), 1.0, lo=0, hi=1)) or 1e-9,
                    top_k=None if top_k in (None, -1, 0) else top_k,
                    seed=_field(body, "seed", (int,), None, lo=0, hi=2 ** 63 - 1 - self.limits.max_n))

    async def _events(self, request: HttpRequest, req: Request):
        """Submit req and yield its events; a client that goes away cancels it."""
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()

        def emit(ev):  # from the engine thread
            try:
                loop.call_soon_threadsafe(q.put_nowait, ev)
            except RuntimeError:  # the event loop is gone (shutting down): stop the row
                req.cancelled.set()

        req.emit = emit
        try:
            self.engine.submit(req)
        except LmzooError as e:
            code = "queue_full" if "queue" in str(e) else None
            raise ApiError(503 if code else 404, str(e), None if code else "model", code,
                           "server_error" if code else "invalid_request_error") from None
        self._count("requests", model=req.model)
        self._count("prompt_tokens", len(req.prompt))
        started, first = time.perf_counter(), None
        checked = started
        try:
            while True:
                try:
                    ev = await asyncio.wait_for(q.get(), timeout=1.0)
                except TimeoutError:
                    ev = None
                # a client that went away frees its row (Starlette cancels only streamed responses itself)
                if ev is None or time.perf_counter() - checked > 1.0:
                    checked = time.perf_counter()
                    if await request.is_disconnected():
                        req.cancelled.set()
                        return
                if ev is None:
                    continue
                if ev[0] == "token":
                    now = time.perf_counter()
                    if first is None:
                        first = now
                        self._observe("ttft", now - started)
                    self._count("tokens", n=1, model=req.model)
                yield ev
                if ev[0] in ("done", "error"):
                    if first is not None and req.generated > 1:
                        self._observe("tpot", (time.perf_counter() - first) / (req.generated - 1))
                    return
        finally:
            req.cancelled.set()  # a consumer that stops early (a stop string, a disconnect) frees the row

    def _count(self, what, n=1, **labels):
        if self.metrics:
            self.metrics.count(what, n, **labels)

    def _observe(self, what, seconds):
        if self.metrics:
            self.metrics.observe(what, seconds)

    def _new_request(self, prompt, model, sampling, stop_ids, j, **extra) -> Request:
        seed = sampling["seed"]
        return Request(prompt=prompt, model=model, max_tokens=sampling["max_tokens"],
                       temperature=sampling["temperature"], top_p=sampling["top_p"], top_k=sampling["top_k"],
                       seed=None if seed is None else seed + j, stop_ids=frozenset(stop_ids), **extra)

    def _token_text(self, token: int) -> str:
        return self.tokenizer.decode([token])


async def _choice(events, out: TextOut):
    """One choice's engine events as ("prompt", info), ("token", text, info) and, last,
    ("finish", text, reason): text is what may be sent now (stop strings held back and cut).
    An engine error becomes an ApiError."""
    reason = "length"
    try:
        async for ev in events:
            if ev[0] == "prompt_logprob":
                yield "prompt", ev[2]
            elif ev[0] == "token":
                yield "token", out.put(ev[1]), ev[2] and {**ev[2], "token": ev[1]}
                if out.stopped:
                    break
            elif ev[0] == "done":
                reason = "stop" if ev[1] == "stop" else "length"
            else:
                raise ApiError(500, ev[1], kind="server_error")
    finally:
        await events.aclose()  # a stop string ended it early: the engine row is freed
    yield "finish", out.finish(), "stop" if out.stopped else reason


async def _merged(streams):
    """(i, item) from several async generators as their items come, so that the choices of one
    streamed request (n > 1) decode side by side; the first ApiError ends it, and leaving early
    closes them all (their engine rows are freed)."""
    q: asyncio.Queue = asyncio.Queue()

    async def pump(i, stream):
        try:
            async for item in stream:
                await q.put((i, item))
        except ApiError as e:
            await q.put((i, e))
        finally:
            await q.put((i, None))

    tasks = [asyncio.create_task(pump(i, stream)) for i, stream in enumerate(streams)]
    try:
        left = len(tasks)
        while left:
            i, item = await q.get()
            if item is None:
                left -= 1
            elif isinstance(item, ApiError):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _collect(events, out: TextOut) -> list:
    return [item async for item in _choice(events, out)]


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def build_app(server: Server) -> Starlette:
    tok = lambda: server.tokenizer  # noqa: E731

    async def handled(request, fn):
        try:
            return await fn(request)
        except ApiError as e:
            server._count("errors", status=str(e.status))
            return e.response()
        except LmzooError as e:
            server._count("errors", status="400")
            return ApiError(400, str(e)).response()
        except Exception as e:  # never a traceback to the client
            return ApiError(500, f"internal error: {type(e).__name__}", kind="server_error").response()

    def route(path, fn, methods=("POST",), auth=True):
        async def endpoint(request):
            async def run(request):
                if auth:
                    server._check_key(request)
                return await fn(request)
            return await handled(request, run)
        return Route(path, endpoint, methods=list(methods))

    # ------------------------------------------------------------------ chat
    async def chat(request):
        body = await server._body(request)
        server._ready()
        model = server._model(body)
        _unsupported(body)
        messages = _messages(body)
        if not tok().chat_template:
            raise ApiError(400, "this model has no chat template: use /v1/completions", "messages")
        prompt = tok().encode_chat(messages, add_generation_prompt=True)
        sampling = server._sampling(body, len(prompt), model, "max_completion_tokens")
        n = _field(body, "n", (int,), 1, lo=1, hi=server.limits.max_n)
        stop = _stop_strings(body, server.limits)
        want_logprobs = _field(body, "logprobs", (bool,), False)
        top = _field(body, "top_logprobs", (int,), 0, lo=0, hi=20)
        stream = _field(body, "stream", (bool,), False)
        usage_chunk = bool(_field(body, "stream_options", (dict,), {}).get("include_usage")) if stream else False
        rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        reqs = [server._new_request(prompt, model, sampling, tok().stop_ids, j,
                                    logprobs=top if want_logprobs else None) for j in range(n)]

        def lp_entry(info):
            return {"token": server._token_text(info["token"]), "logprob": info["logprob"],
                    "bytes": list(server._token_text(info["token"]).encode()),
                    "top_logprobs": [{"token": server._token_text(t), "logprob": lp,
                                      "bytes": list(server._token_text(t).encode())} for t, lp in info.get("top", [])]}

        if not stream:
            try:
                results = await asyncio.gather(*(_collect(server._events(request, r), TextOut(tok(), stop))
                                                 for r in reqs))
            finally:  # one choice failed (a full queue): the others stop too
                for r in reqs:
                    r.cancelled.set()
            choices, completion = [], 0
            for j, items in enumerate(results):
                tokens = [it for it in items if it[0] == "token"]
                completion += len(tokens)
                content = "".join(it[1] for it in items if it[0] != "prompt")
                choices.append({"index": j, "message": {"role": "assistant", "content": content},
                                "logprobs": {"content": [lp_entry(it[2]) for it in tokens]} if want_logprobs else None,
                                "finish_reason": items[-1][2]})
            return JSONResponse({"id": rid, "object": "chat.completion", "created": created, "model": model,
                                 "choices": choices, "usage": _usage(len(prompt), completion)})

        async def events():
            completion = 0
            base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model}
            for j in range(n):
                yield _sse({**base, "choices": [{"index": j, "delta": {"role": "assistant", "content": ""},
                                                 "logprobs": None, "finish_reason": None}]})
            try:  # n > 1: the choices decode side by side, their chunks interleaved
                async for j, item in _merged([_choice(server._events(request, req), TextOut(tok(), stop))
                                              for req in reqs]):
                    if item[0] == "token":
                        completion += 1
                        lp = {"content": [lp_entry(item[2])]} if item[2] is not None else None
                        if item[1] or lp:
                            yield _sse({**base, "choices": [{"index": j, "delta": {"content": item[1]},
                                                             "logprobs": lp, "finish_reason": None}]})
                    elif item[0] == "finish":
                        if item[1]:
                            yield _sse({**base, "choices": [{"index": j, "delta": {"content": item[1]},
                                                             "logprobs": None, "finish_reason": None}]})
                        yield _sse({**base, "choices": [{"index": j, "delta": {}, "logprobs": None,
                                                         "finish_reason": item[2]}]})
            except ApiError as e:
                yield _sse(json.loads(e.response().body))
                return
            if usage_chunk:
                yield _sse({**base, "choices": [], "usage": _usage(len(prompt), completion)})
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    # ------------------------------------------------------------------ completions
    def _prompts(body) -> list[list[int]]:
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            return [tok().encode(prompt)]
        if isinstance(prompt, list) and prompt:
            if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
                return [prompt]
            if all(isinstance(p, str) for p in prompt):
                return [tok().encode(p) for p in prompt]
            if all(isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p)
                   for p in prompt):
                return prompt
        raise ApiError(400, "'prompt' must be a string, a list of strings, a list of token ids, or a list of those",
                       "prompt")

    async def completions(request):
        body = await server._body(request)
        server._ready()
        model = server._model(body)
        _unsupported(body)
        prompts = _prompts(body)
        vocab = tok().vocab_size
        for p in prompts:
            if any(not 0 <= t < vocab for t in p):
                raise ApiError(400, f"'prompt' holds a token id outside 0..{vocab - 1}", "prompt")
        samplings = [server._sampling(body, len(p), model, "max_tokens") for p in prompts]
        n = _field(body, "n", (int,), 1, lo=1, hi=server.limits.max_n)
        if n * len(prompts) > server.limits.max_n * 4:
            raise ApiError(400, f"{len(prompts)} prompts x n={n} choices is over the limit of "
                                f"{server.limits.max_n * 4}", "n")
        stop = _stop_strings(body, server.limits)
        k = _field(body, "logprobs", (int,), None, lo=0, hi=20)
        echo = _field(body, "echo", (bool,), False)
        stream = _field(body, "stream", (bool,), False)
        usage_chunk = bool(_field(body, "stream_options", (dict,), {}).get("include_usage")) if stream else False
        rid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        jobs = [(i * n + j, p, server._new_request(p, model, s, tok().stop_ids, j, logprobs=k,
                                                   echo_logprobs=echo and k is not None))
                for i, (p, s) in enumerate(zip(prompts, samplings, strict=True)) for j in range(n)]
        prompt_tokens = sum(len(p) for p in prompts)  # each prompt once, as OpenAI counts, whatever n is

        def logprob_block(tokens, logprobs, tops, offset):
            texts = [server._token_text(t) for t in tokens]
            offsets, at = [], offset
            for t in texts:
                offsets.append(at)
                at += len(t)
            tops = [None if tp is None else {server._token_text(t): lp for t, lp in tp} for tp in tops]
            return {"tokens": texts, "token_logprobs": logprobs, "top_logprobs": tops, "text_offset": offsets}

        if not stream:
            try:
                results = await asyncio.gather(*(_collect(server._events(request, r), TextOut(tok(), stop))
                                                 for _, _, r in jobs))
            finally:  # one choice failed (a full queue): the others stop too
                for _, _, r in jobs:
                    r.cancelled.set()
            choices, completion = [], 0
            for (index, p, _), items in zip(jobs, results, strict=True):
                tokens = [it for it in items if it[0] == "token"]
                completion += len(tokens)
                text = "".join(it[1] for it in items if it[0] != "prompt")
                if k is not None:  # echo: the prompt's tokens first; its first token has no log-probability
                    scored = ([{"token": p[0], "logprob": None}] + [it[1] for it in items if it[0] == "prompt"]
                              if echo else [])
                    scored += [it[2] for it in tokens]
                    logprobs = logprob_block([e["token"] for e in scored], [e["logprob"] for e in scored],
                                             [e.get("top") if k else None for e in scored], 0)
                choices.append({"index": index, "text": (tok().decode(p) if echo else "") + text,
                                "logprobs": logprobs if k is not None else None, "finish_reason": items[-1][2]})
            return JSONResponse({"id": rid, "object": "text_completion", "created": created, "model": model,
                                 "choices": choices, "usage": _usage(prompt_tokens, completion)})

        async def events():
            completion = 0
            base = {"id": rid, "object": "text_completion", "created": created, "model": model}
            try:  # every choice of every prompt decodes side by side, their chunks interleaved
                if echo:
                    for index, p, _ in jobs:
                        yield _sse({**base, "choices": [{"index": index, "text": tok().decode(p), "logprobs": None,
                                                         "finish_reason": None}]})
                async for i, item in _merged([_choice(server._events(request, req), TextOut(tok(), stop))
                                              for _, _, req in jobs]):
                    index = jobs[i][0]
                    if item[0] == "token":
                        completion += 1
                        lp = None if k is None else logprob_block(
                            [item[2]["token"]], [item[2]["logprob"]], [item[2].get("top") if k else None], 0)
                        yield _sse({**base, "choices": [{"index": index, "text": item[1], "logprobs": lp,
                                                         "finish_reason": None}]})
                    elif item[0] == "finish":
                        yield _sse({**base, "choices": [{"index": index, "text": item[1], "logprobs": None,
                                                         "finish_reason": item[2]}]})
            except ApiError as e:
                yield _sse(json.loads(e.response().body))
                return
            if usage_chunk:
                yield _sse({**base, "choices": [], "usage": _usage(prompt_tokens, completion)})
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    # ------------------------------------------------------------------ the rest
    async def models(request):
        server._ready()
        return JSONResponse({"object": "list", "data": [
            {"id": name, "object": "model", "created": server.created, "owned_by": "lmzoo",
             "root": server.engine.batch_of(name)} for name in server.engine.names()]})

    async def tokenize(request):
        body = await server._body(request)
        server._ready()
        model = server._model(body, required=False)
        if "messages" in body:
            tokens = tok().encode_chat(_messages(body), add_generation_prompt=bool(body.get("add_generation_prompt",
                                                                                              True)))
        elif isinstance(body.get("prompt"), str):
            tokens = tok().encode(body["prompt"], add_special_tokens=bool(body.get("add_special_tokens", True)))
        else:
            raise ApiError(400, "give 'prompt' (a string) or 'messages'", "prompt")
        return JSONResponse({"tokens": tokens, "count": len(tokens), "max_model_len": server.engine.context_of(model)})

    async def detokenize(request):
        body = await server._body(request)
        server._ready()
        tokens = body.get("tokens")
        if not isinstance(tokens, list) or not all(isinstance(t, int) and 0 <= t < tok().vocab_size for t in tokens):
            raise ApiError(400, f"'tokens' must be a list of token ids in 0..{tok().vocab_size - 1}", "tokens")
        return JSONResponse({"prompt": tok().decode(tokens)})

    async def health(request):
        if server.engine is None:
            return JSONResponse({"status": "error" if server.error else "loading", "message": server.error},
                                status_code=503)
        return JSONResponse({"status": "ok"})

    async def metrics(request):
        if server.metrics is None:
            return Response("prometheus-client is not installed\n", status_code=404, media_type="text/plain")
        if server.engine is not None:
            server.metrics.gauge(server.engine)
        body, content_type = server.metrics.render()
        return Response(body, media_type=content_type)

    async def page(request):
        with open(os.path.join(os.path.dirname(__file__), "chat.html"), encoding="utf-8") as f:
            return HTMLResponse(f.read())

    routes = [
        route("/v1/chat/completions", chat), route("/v1/completions", completions),
        route("/v1/models", models, ("GET",)), route("/tokenize", tokenize), route("/detokenize", detokenize),
        route("/health", health, ("GET",), auth=False), route("/metrics", metrics, ("GET",), auth=False),
        route("/", page, ("GET",), auth=False),
    ]

    async def not_found(request, exc):
        return ApiError(404, f"no route {request.method} {request.url.path}", code="not_found").response()

    async def bad_method(request, exc):
        return ApiError(405, f"{request.method} is not allowed on {request.url.path}").response()

    return Starlette(routes=routes, exception_handlers={404: not_found, 405: bad_method})


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
