"""The Starlette application: OpenAI-compatible endpoints over the engine thread.

``create_app(model, ...)`` returns an ASGI app (run it with uvicorn; ``gptevo serve`` does). Routes:
``GET /health``, ``GET /metrics``, ``GET /v1/models``, ``GET /v1/models/{id}``,
``POST /v1/completions``, ``POST /v1/chat/completions``. With ``api_key`` every ``/v1/`` route needs
``Authorization: Bearer <key>`` (401 otherwise); ``/health`` and ``/metrics`` stay open for probes.

A request goes: bearer check -> body read under a size limit (413) and a time limit (408) -> strict
JSON (400 for malformed JSON or invalid UTF-8) -> field checks (400 naming the field; 404 for another
model's name) -> prompt ids, checked against the context (400, code ``context_length_exceeded``) ->
admission (503 with ``Retry-After`` when the queue is full) -> tokens from the engine, as one JSON
object or as server-sent events (``data: {chunk}`` lines, then ``data: [DONE]``).

A client that disconnects is noticed while it waits (non-streaming: a task watching the ASGI
``http.disconnect``; streaming: Starlette cancels the response) and its generation is cancelled in
the engine, which frees its cache. Such requests count as status 499 in ``/metrics``.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import os
import time
import uuid

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from gptevo.errors import GptevoError, RequestError
from gptevo.generation import encode_prompt, sampling_for
from gptevo.serve.engine import Engine
from gptevo.serve.errors import ApiError, bad_request
from gptevo.serve.formats import TextReply, chat_format
from gptevo.serve.metrics import Metrics
from gptevo.serve.protocol import (chat_chunk, chat_object, completion_object, parse_chat, parse_completion,
                                   usage, usage_chunk_completion)
from gptevo.strict_json import loads_strict

DEFAULT_COMPLETION_TOKENS = 16          # OpenAI's default max_tokens for /v1/completions
CLIENT_GONE = 499                       # status recorded for requests whose client disconnected


class ServerConfig:
    """Limits of one server (``gptevo serve`` flags)."""

    def __init__(self, *, served_name: str, api_key: str | None = None, max_batch: int = 8,
                 max_queue: int = 64, max_body_bytes: int = 2 * 1024 * 1024, body_timeout_s: float = 30.0,
                 max_tokens: int = 2048):
        self.served_name = served_name
        self.api_key = api_key or None
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.max_body_bytes = max_body_bytes
        self.body_timeout_s = body_timeout_s
        self.max_tokens = max_tokens


def make_decoder(model, max_batch: int):
    try:
        from gptevo.batching import BatchDecoder
    except ImportError as exc:
        raise GptevoError(f"gptevo serve needs gptevo.batching (batched decode): {exc}") from None
    return BatchDecoder(model, max_batch=max_batch)


def _error(exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


async def _read_json(request: Request, config: ServerConfig):
    """The body as JSON, within the size and time limits (see the module doc)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise bad_request(f"Content-Length must be a number, got {declared[:40]!r}")
        if int(declared) > config.max_body_bytes:
            raise ApiError(413, f"the request body of {declared} bytes exceeds this server's limit of "
                                f"{config.max_body_bytes} bytes", code="body_too_large")
    chunks: list[bytes] = []
    size = 0

    async def read() -> None:
        nonlocal size
        async for chunk in request.stream():
            size += len(chunk)
            if size > config.max_body_bytes:
                raise ApiError(413, f"the request body exceeds this server's limit of {config.max_body_bytes} "
                                    f"bytes", code="body_too_large")
            chunks.append(chunk)

    try:
        await asyncio.wait_for(read(), config.body_timeout_s)
    except asyncio.TimeoutError:
        raise ApiError(408, f"the request body did not arrive within {config.body_timeout_s:g} s",
                       code="request_timeout") from None
    try:
        return loads_strict(b"".join(chunks), "the request body", RequestError)
    except RequestError as exc:
        raise bad_request(str(exc), code="invalid_json") from None


async def _wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _sse(obj) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


class Server:
    """State shared by the handlers: model, tokenizer, chat format, engine, metrics, limits."""

    def __init__(self, model, tokenizer, engine: Engine, config: ServerConfig, template_path=None):
        self.model = model
        self.tokenizer = tokenizer
        self.engine = engine
        self.config = config
        self.metrics = engine.metrics
        self.context = model.config.context_length
        self.vocab_size = model.config.vocab_size
        self.eos = tuple(model.config.eos_token_ids)
        self.chat = chat_format(model, tokenizer, template_path)
        self.created = int(time.time())

    # -- helpers ------------------------------------------------------------------------------------
    def authorize(self, request: Request) -> None:
        key = self.config.api_key
        if key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise ApiError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    def max_new_tokens(self, asked: int | None, prompt_len: int, default: int, param: str) -> int:
        room = self.context - prompt_len
        if room < 1:
            raise bad_request(f"the prompt of {prompt_len} tokens leaves no room in the model's context of "
                              f"{self.context} tokens", param, "context_length_exceeded")
        if asked is None:
            return min(default, room, self.config.max_tokens)
        if asked > self.config.max_tokens:
            raise bad_request(f"max_tokens={asked} exceeds this server's limit of {self.config.max_tokens} "
                              f"(gptevo serve --max-tokens)", "max_tokens")
        if asked > room:
            raise bad_request(f"the prompt of {prompt_len} tokens + max_tokens={asked} = {prompt_len + asked} "
                              f"exceeds the model's context of {self.context} tokens", "max_tokens",
                              "context_length_exceeded")
        return asked

    def completion_ids(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            return encode_prompt(self.tokenizer, prompt)
        bad = next((t for t in prompt if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise bad_request(f"prompt token id {bad} is out of range [0, {self.vocab_size})", "prompt")
        return list(prompt)

    # -- handlers -----------------------------------------------------------------------------------
    async def health(self, request: Request) -> Response:
        if self.engine.draining:
            return JSONResponse({"status": "draining", "in_flight": self.engine.in_flight}, status_code=503)
        return JSONResponse({"status": "ok", "in_flight": self.engine.in_flight})

    async def metrics_text(self, request: Request) -> Response:
        return PlainTextResponse(self.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    def _model_card(self) -> dict:
        return {"id": self.config.served_name, "object": "model", "created": self.created, "owned_by": "gptevo",
                "max_model_len": self.context}

    async def models(self, request: Request) -> Response:
        try:
            self.authorize(request)
        except ApiError as exc:
            return _error(exc)
        return JSONResponse({"object": "list", "data": [self._model_card()]})

    async def one_model(self, request: Request) -> Response:
        try:
            self.authorize(request)
            name = request.path_params["name"]
            if name != self.config.served_name:
                raise ApiError(404, f"the model {name[:100]!r} does not exist on this server",
                               code="model_not_found")
        except ApiError as exc:
            return _error(exc)
        return JSONResponse(self._model_card())

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, "/v1/completions")

    async def chat_completions(self, request: Request) -> Response:
        return await self._generate(request, "/v1/chat/completions")

    async def _prepare(self, request: Request, endpoint: str):
        """Checks, prompt ids and admission: (parsed request, prompt ids, reply assembler, handle)."""
        if self.engine.draining:            # arrived after SIGTERM; those that came before still run
            raise ApiError(503, "the server is shutting down", type="server_error", code="shutting_down")
        self.authorize(request)
        body = await _read_json(request, self.config)
        loop = asyncio.get_running_loop()
        if endpoint == "/v1/completions":
            req = parse_completion(body, self.config.served_name)
            ids = await loop.run_in_executor(None, self.completion_ids, req.prompt)
            param, default = "prompt", DEFAULT_COMPLETION_TOKENS
            stop_ids = self.eos
            reply = TextReply(self.tokenizer, ids, req.options.stop, stop_ids, "text")
        else:
            req = parse_chat(body, self.config.served_name)
            ids = await loop.run_in_executor(None, self.chat.prompt_ids, req.messages, req.reasoning_effort)
            param, default = "messages", self.config.max_tokens
            stop_ids = self.chat.stop_ids
            reply = self.chat.reply(ids, req.options.stop)
        n_new = self.max_new_tokens(req.options.max_tokens, len(ids), default, param)
        sampling = sampling_for(self.model, **req.options.sampling)
        handle = self.engine.submit(ids, max_new_tokens=n_new, sampling=sampling, stop_token_ids=stop_ids)
        return req, ids, reply, handle

    async def _generate(self, request: Request, endpoint: str) -> Response:
        try:
            req, ids, reply, handle = await self._prepare(request, endpoint)
        except ApiError as exc:
            self.metrics.request_done(endpoint, exc.status)
            return _error(exc)
        except ClientDisconnect:
            self.metrics.request_done(endpoint, CLIENT_GONE)
            return Response(status_code=400)
        except (RequestError, UnicodeError) as exc:       # prompt encoding, chat template refusals
            self.metrics.request_done(endpoint, 400)
            return _error(bad_request(str(exc)))
        except GptevoError as exc:                         # e.g. a chat template that fails to render
            self.metrics.request_done(endpoint, 500)
            return _error(ApiError(500, str(exc), type="server_error"))
        rid = ("cmpl-" if endpoint == "/v1/completions" else "chatcmpl-") + uuid.uuid4().hex
        run = _Run(self, handle, reply, endpoint, rid, len(ids))
        if req.options.stream:
            return StreamingResponse(run.sse(req.options.include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await run.whole(request)


class _Run:
    """The tokens of one admitted request, turned into a response."""

    def __init__(self, server: Server, handle, reply, endpoint: str, rid: str, prompt_tokens: int):
        self.server = server
        self.handle = handle
        self.reply = reply
        self.endpoint = endpoint
        self.rid = rid
        self.created = int(time.time())
        self.prompt_tokens = prompt_tokens
        self.generated = 0
        self.finish: str | None = None

    async def deltas(self):
        """Yield lists of (field, text) until the request finishes; sets ``finish``."""
        engine = self.server.engine
        while self.finish is None:
            events = await self.handle.next_events()
            if self.generated == 0 and events:
                self.server.metrics.first_token(time.monotonic() - self.handle.admitted_at)
            out = []
            for ev in events:
                self.generated += 1
                out += self.reply.push(ev.token_id)
                if self.reply.stopped:                      # a stop string: end here, free the cache
                    engine.cancel(self.handle)
                    self.finish = "stop"
                    break
                if ev.finished:
                    out += self.reply.finish()
                    self.finish = ev.finish_reason or ("stop" if getattr(self.reply, "ended", False) else "length")
                    break
            if out:
                yield out

    def usage(self) -> dict:
        return usage(self.prompt_tokens, self.generated)

    def _chunk(self, delta: dict | None, finish=None, use=None) -> dict:
        s = self.server
        if self.endpoint == "/v1/completions":
            if delta is None:
                return usage_chunk_completion(self.rid, self.created, s.config.served_name, use)
            return completion_object(self.rid, self.created, s.config.served_name, delta.get("text", ""), finish,
                                     None, chunk=True)
        return chat_chunk(self.rid, self.created, s.config.served_name, delta, finish, use)

    async def sse(self, include_usage: bool):
        status = 200
        try:
            if self.endpoint == "/v1/chat/completions":
                yield _sse(self._chunk({"role": "assistant", "content": ""}))
            async for out in self.deltas():
                for field, text in out:
                    yield _sse(self._chunk({field: text}))
            yield _sse(self._chunk({} if self.endpoint != "/v1/completions" else {"text": ""}, self.finish))
            if include_usage:
                yield _sse(self._chunk(None, use=self.usage()))
            yield b"data: [DONE]\n\n"
        except ApiError as exc:                              # the engine failed this request
            status = exc.status
            yield _sse(exc.body())
            yield b"data: [DONE]\n\n"
        except (asyncio.CancelledError, GeneratorExit):
            status = CLIENT_GONE
            raise
        finally:
            if self.server.engine.cancel(self.handle):
                self.server.metrics.add(cancelled=1)
                status = CLIENT_GONE if status == 200 and self.finish is None else status
            self.server.metrics.request_done(self.endpoint, status)

    async def _collect(self) -> dict:
        fields: dict[str, list[str]] = {}
        async for out in self.deltas():
            for field, text in out:
                fields.setdefault(field, []).append(text)
        return {k: "".join(v) for k, v in fields.items()}

    async def whole(self, request: Request) -> Response:
        collect = asyncio.ensure_future(self._collect())
        gone = asyncio.ensure_future(_wait_disconnect(request))
        try:
            await asyncio.wait({collect, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not collect.done():
                collect.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await collect
        s = self.server
        if collect.cancelled() or not collect.done():
            if s.engine.cancel(self.handle):
                s.metrics.add(cancelled=1)
            s.metrics.request_done(self.endpoint, CLIENT_GONE)
            return Response(status_code=CLIENT_GONE)
        exc = collect.exception()
        if exc is not None:
            s.engine.cancel(self.handle)
            status = exc.status if isinstance(exc, ApiError) else 500
            s.metrics.request_done(self.endpoint, status)
            return _error(exc if isinstance(exc, ApiError) else ApiError(500, str(exc), type="server_error"))
        fields = collect.result()
        s.metrics.request_done(self.endpoint, 200)
        name = s.config.served_name
        if self.endpoint == "/v1/completions":
            return JSONResponse(completion_object(self.rid, self.created, name, fields.get("text", ""),
                                                  self.finish, self.usage()))
        return JSONResponse(chat_object(self.rid, self.created, name, fields.get("content", ""),
                                        fields.get("reasoning_content", ""), self.finish, self.usage()))


async def _not_found(request: Request, exc: HTTPException) -> Response:
    kind = "invalid_request_error"
    if exc.status_code == 404:
        msg = f"no route {request.method} {request.url.path[:200]}; see /v1/models, /v1/completions, " \
              f"/v1/chat/completions, /health, /metrics"
    elif exc.status_code == 405:
        msg = f"method {request.method} is not allowed on {request.url.path[:200]}"
    else:
        msg = str(exc.detail)
    return JSONResponse({"error": {"message": msg, "type": kind, "param": None, "code": None}},
                        status_code=exc.status_code, headers=getattr(exc, "headers", None))


def create_app(model, *, config: ServerConfig | None = None, tokenizer=None, decoder=None,
               template_path: str | None = None, metrics: Metrics | None = None) -> Starlette:
    """An ASGI app serving ``model`` (a loaded gptevo model with a tokenizer); see the module doc.

    ``decoder`` defaults to ``gptevo.batching.BatchDecoder(model, max_batch=config.max_batch)``; the
    engine thread starts with the app's lifespan and stops (failing what is left) when it ends.
    """
    from gptevo.generation import tokenizer_for

    if config is None:
        config = ServerConfig(served_name=os.path.basename(os.path.normpath(model.path or "model")))
    tokenizer = tokenizer or tokenizer_for(model)
    decoder = decoder if decoder is not None else make_decoder(model, config.max_batch)
    engine = Engine(decoder, max_batch=config.max_batch, max_queue=config.max_queue, metrics=metrics)
    server = Server(model, tokenizer, engine, config, template_path)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    routes = [Route("/health", server.health, methods=["GET"]),
              Route("/metrics", server.metrics_text, methods=["GET"]),
              Route("/v1/models", server.models, methods=["GET"]),
              Route("/v1/models/{name:path}", server.one_model, methods=["GET"]),
              Route("/v1/completions", server.completions, methods=["POST"]),
              Route("/v1/chat/completions", server.chat_completions, methods=["POST"])]
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={HTTPException: _not_found})
    app.state.server = server
    return app
