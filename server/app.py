"""The ASGI app: OpenAI's chat and text completion endpoints over one loaded ``Pipeline``.

Built on FastAPI (on Starlette, served by uvicorn) because what an OpenAI-compatible server needs
is what it does well: pydantic validation of the request bodies (strict types; each error names
its field, turned here into OpenAI's error object), an OpenAPI schema of the API for free
(``/docs``, ``/openapi.json``) and Starlette's streaming responses for server-sent events, which
also notice a client that disconnects mid-stream.  Nothing at the HTTP layer is written by hand.

Semantics, so that the server gives exactly what ``specrun generate`` gives:

- ``/v1/chat/completions`` renders ``messages`` with the model's chat template (with the generation
  prompt); one user message is ``specrun generate PROMPT``.  ``/v1/completions`` continues the raw
  ``prompt`` (``specrun generate --raw PROMPT``); a list of token ids is taken as is.
- ``temperature`` (default 0: greedy, as ``generate``), ``top_p``, ``top_k`` and ``seed`` make the
  same ``SamplingParams`` as the CLI; ``stop`` is the CLI's ``--stop``; ``max_tokens`` /
  ``max_completion_tokens`` its ``--max-new-tokens`` (default: the server's ``--max-new-tokens``).
- Responses carry ``usage`` and a ``specrun`` object with the speculative statistics;
  ``"return_token_ids": true`` (an extension, as vLLM's) adds the prompt and completion token ids.
- Fields specrun does not implement (``n > 1``, ``logprobs``, tools ...) answer 400 naming them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import attrs
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from specrun.errors import SpecrunError
from specrun.sampling import SamplingParams, check_stop_strings
from specrun.tokenizer import check_text, render_chat

from .engine import Engine, Job, Outcome, QueueFull, ShuttingDown
from .errors import APIError, error_body
from .metrics import Metrics
from .schemas import (
    ChatRequest,
    CompletionRequest,
    RequestBase,
    chat_messages,
    check_supported,
    max_new_tokens,
    stop_strings,
)

log = logging.getLogger("specrun.serve")

RETRY_AFTER_SECONDS = 1
DISCONNECT_POLL_SECONDS = 0.25  # how often a non-streamed request checks that its client is still there
_TYPE_NAMES = {"str", "int", "float", "bool", "list", "dict", "none", "model"}


@attrs.define
class Prepared:
    """A validated request, ready for the engine."""

    kind: str  # "chat" or "completion"
    ids: list[int]
    max_new_tokens: int
    sampling: SamplingParams
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool
    return_token_ids: bool
    id: str
    created: int
    model: str


def create_app(pipeline, *, model_id: str, max_queue: int = 16, default_max_tokens: int = 128) -> FastAPI:
    """The app serving ``pipeline`` (a loaded ``specrun.pipeline.Pipeline``) as ``model_id``."""
    metrics = Metrics.create()
    engine = Engine(pipeline, max_queue=max_queue, metrics=metrics)
    loaded_at = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await run_in_threadpool(engine.shutdown)

    app = FastAPI(title="specrun", summary="OpenAI-compatible speculative decoding server", lifespan=lifespan)
    app.state.engine, app.state.metrics, app.state.model_id = engine, metrics, model_id
    app.add_middleware(_JSONBodies)
    app.add_middleware(_CountRequests, metrics=metrics)

    # ---------------------------------------------------------------- errors: OpenAI's error object

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(_validation_error(exc.errors()).body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 404:
            message = f"no such endpoint: {request.method} {request.url.path}"
        elif exc.status_code == 405:
            message = f"method {request.method} is not allowed on {request.url.path}"
        else:
            message = str(exc.detail)
        err = APIError(exc.status_code, message, code="unknown_url" if exc.status_code == 404 else None)
        return JSONResponse(err.body(), status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse(error_body(_internal_message(exc), "server_error"), status_code=500)

    # ---------------------------------------------------------------- endpoints

    def model_object() -> dict:
        return {"id": model_id, "object": "model", "created": loaded_at, "owned_by": "specrun"}

    def check_model(name: str | None) -> None:
        if name and name != model_id:
            raise APIError(404, f"the model '{name}' does not exist; this server serves '{model_id}'",
                           param="model", code="model_not_found")

    @app.get("/health")
    async def health() -> dict:
        st = pipeline.decoder.stats
        return {"status": "ok", "model": model_id, "running": engine.running, "queued": engine.waiting,
                "max_queue": engine.max_queue, "backend": getattr(pipeline.target, "backend", st.backend),
                "device": getattr(pipeline.target, "device", st.device),
                "precision": getattr(pipeline.target, "precision", st.precision),
                "drafter": getattr(pipeline.drafter, "name", st.drafter)}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [model_object()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str) -> dict:
        check_model(name)
        return model_object()

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request) -> Response:
        check_model(body.model)
        check_supported(body)
        messages = chat_messages(body)
        ids = await run_in_threadpool(_encode_chat, pipeline, messages)
        return await run(request, _prepare("chat", body, ids))

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        check_model(body.model)
        check_supported(body)
        ids = await run_in_threadpool(_encode_prompt, pipeline, body.prompt)
        return await run(request, _prepare("completion", body, ids))

    # ---------------------------------------------------------------- running a request

    def _prepare(kind: str, body: RequestBase, ids: list[int]) -> Prepared:
        n = max_new_tokens(body, default_max_tokens)
        try:
            sampling = SamplingParams(temperature=0.0 if body.temperature is None else body.temperature,
                                      top_k=body.top_k or 0, top_p=1.0 if body.top_p is None else body.top_p,
                                      seed=body.seed)
        except SpecrunError as exc:
            text = str(exc)
            param = next((p for p, word in (("temperature", "temperature"), ("top_k", "top-k"), ("top_p", "top-p"))
                          if text.startswith(word)), None)
            raise APIError(400, text, param=param) from None
        try:
            pipeline.decoder.check_length(len(ids), n)
        except SpecrunError as exc:
            long = "context limit" in str(exc)
            raise APIError(400, str(exc), param="messages" if long and kind == "chat" else
                           ("prompt" if long else "max_tokens"),
                           code="context_length_exceeded" if long else None) from None
        try:
            stop = check_stop_strings(stop_strings(body))
        except SpecrunError as exc:
            raise APIError(400, str(exc), param="stop") from None
        opts = body.stream_options
        return Prepared(kind=kind, ids=ids, max_new_tokens=n, sampling=sampling, stop=stop,
                        stream=bool(body.stream), include_usage=bool(opts and opts.include_usage),
                        return_token_ids=bool(body.return_token_ids),
                        id=("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex, created=int(time.time()),
                        model=model_id)

    async def run(request: Request, p: Prepared) -> Response:
        job = Job(p.ids, p.max_new_tokens, p.sampling, p.stop, asyncio.get_running_loop())
        try:
            engine.submit(job)
        except QueueFull:
            raise APIError(429, f"the server is busy: {engine.max_queue} requests already wait for the engine "
                           f"(--max-queue {engine.max_queue}); retry in {RETRY_AFTER_SECONDS} s",
                           code="rate_limit_exceeded", headers={"Retry-After": str(RETRY_AFTER_SECONDS)}) from None
        except ShuttingDown:
            raise APIError(503, "the server is shutting down", headers={"Retry-After": str(RETRY_AFTER_SECONDS)}) from None
        if p.stream:
            return StreamingResponse(_sse(job, p), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        outcome = await _wait(job, request)
        if outcome is None:  # the client went away; nobody reads this
            return Response(status_code=499)
        return JSONResponse(_full_response(p, outcome))

    async def _wait(job: Job, request: Request) -> Outcome | None:
        """The outcome of a non-streamed job; cancels it if the client disconnects meanwhile."""
        loop = asyncio.get_running_loop()
        next_check = loop.time() + DISCONNECT_POLL_SECONDS
        get: asyncio.Future | None = None
        while True:
            if get is None:
                get = asyncio.ensure_future(job.events.get())
            done, _ = await asyncio.wait({get}, timeout=DISCONNECT_POLL_SECONDS)
            if done:
                kind, value = get.result()
                get = None
                if kind == "done":
                    return None if value.cancelled else value
                if kind == "error":
                    raise _job_error(value)
            if loop.time() >= next_check:
                next_check = loop.time() + DISCONNECT_POLL_SECONDS
                if await request.is_disconnected():
                    job.cancel()

    async def _sse(job: Job, p: Prepared) -> AsyncIterator[str]:
        try:
            if p.kind == "chat":
                yield _event(_chunk(p, {"role": "assistant", "content": ""}))
            while True:
                kind, value = await job.events.get()
                if kind == "text":
                    if value:
                        yield _event(_chunk(p, value if p.kind == "completion" else {"content": value}))
                elif kind == "error":
                    yield _event(_job_error(value).body())
                    return
                else:
                    if value.cancelled:
                        return
                    yield _event(_chunk(p, "" if p.kind == "completion" else {}, value))
                    if p.include_usage:
                        yield _event(_usage_chunk(p, value))
                    yield "data: [DONE]\n\n"
                    return
        finally:
            job.cancel()  # a no-op when the job is over; stops it at the next block when the client left

    return app


# -------------------------------------------------------------------- helpers


def _encode_chat(pipeline, messages: list[dict[str, str]]) -> list[int]:
    if not any(m["content"].strip() for m in messages):
        raise APIError(400, "the prompt is empty; give some text", param="messages")
    tok = pipeline.tokenizer
    if not getattr(tok, "chat_template", None):
        raise APIError(400, "this model has no chat template; use /v1/completions with a raw prompt", param="messages")
    try:
        for i, m in enumerate(messages):
            check_text(m["content"], f"message {i}")
        text = render_chat(tok, messages, add_generation_prompt=True)  # as Pipeline.encode
    except SpecrunError as exc:  # not UTF-8, or the template refused the messages (raise_exception)
        raise APIError(400, str(exc), param="messages") from None
    return tok.encode(text, add_special_tokens=False)


def _encode_prompt(pipeline, prompt: str | list) -> list[int]:
    if isinstance(prompt, list):
        if not prompt:
            raise APIError(400, "the prompt is empty; give some text", param="prompt")
        if isinstance(prompt[0], str | list):
            if len(prompt) > 1:
                raise APIError(400, f"a batch of {len(prompt)} prompts is not supported; send one prompt per request",
                               param="prompt", code="unsupported_parameter")
            prompt = prompt[0]
    if isinstance(prompt, str):
        try:
            return pipeline.encode(prompt, raw=True)
        except SpecrunError as exc:
            raise APIError(400, str(exc), param="prompt") from None
    vocab = pipeline.config.vocab_size
    bad = next((t for t in prompt if not 0 <= t < vocab), None)
    if bad is not None:
        raise APIError(400, f"token id {bad} is outside the model's vocabulary (0..{vocab - 1})", param="prompt")
    if not prompt:
        raise APIError(400, "the prompt is empty; give some text", param="prompt")
    return list(prompt)


def _job_error(exc: BaseException) -> APIError:
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, SpecrunError):
        return APIError(400, str(exc))
    return APIError(500, _internal_message(exc))


def _internal_message(exc: BaseException) -> str:
    detail = str(exc).splitlines()[0] if str(exc) else ""
    return f"internal error ({type(exc).__name__}{': ' + detail if detail else ''}); see the server log"


def _validation_error(errors: list[dict[str, Any]]) -> APIError:
    """OpenAI's 400 for the first pydantic error (all of a union's alternatives in one message)."""
    first = errors[0]
    loc = [x for x in first.get("loc", ()) if x != "body"]
    if first.get("type") == "json_invalid":
        ctx = first.get("ctx") or {}
        return APIError(400, f"the request body is not valid JSON ({ctx.get('error', first.get('msg'))})")
    param = _param(loc)
    if first.get("type") == "extra_forbidden":
        return APIError(400, f"unsupported field '{param}': specrun serve does not implement it; remove it",
                        param=param, code="unsupported_parameter")
    if first.get("type") == "missing":
        return APIError(400, f"'{param}' is required", param=param)
    if not param:
        return APIError(400, f"the request body must be a JSON object ({first.get('msg')})")
    msgs = []
    for e in errors:
        if _param([x for x in e.get("loc", ()) if x != "body"]) == param and e.get("msg") not in msgs:
            msgs.append(e.get("msg"))
    return APIError(400, f"invalid value for '{param}': {'; or '.join(msgs)}", param=param)


def _param(loc: list) -> str:
    out = ""
    for x in loc:
        if isinstance(x, int):
            out += f"[{x}]"
        elif isinstance(x, str) and x.isidentifier() and x not in _TYPE_NAMES:
            out += f".{x}" if out else x
        else:
            break  # a union alternative ('list[str]', 'function-after[...]'): the field itself is named
    return out


def _event(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _finish_reason(outcome: Outcome) -> str:
    return "length" if outcome.stats.stop_reason == "length" else "stop"


def _usage(p: Prepared, outcome: Outcome) -> dict:
    n = len(outcome.token_ids)
    return {"prompt_tokens": len(p.ids), "completion_tokens": n, "total_tokens": len(p.ids) + n}


def _extension(p: Prepared, outcome: Outcome) -> dict:
    st = outcome.stats
    ext = {
        "acceptance_length": st.acceptance_length, "drafted": st.drafted, "accepted": st.accepted,
        "target_calls": st.target_calls, "tokens_per_second": st.tokens_per_second,
        "time_to_first_token": st.time_to_first_token, "decode_seconds": st.decode_seconds,
        "queue_seconds": outcome.queue_seconds, "stop_reason": st.stop_reason,
        "backend": st.backend, "device": st.device, "precision": st.precision, "drafter": st.drafter,
        "draft_runs_on": st.draft_runs_on, "num_draft_tokens": st.num_draft_tokens,
    }
    if p.return_token_ids:
        ext["prompt_token_ids"] = p.ids
        ext["token_ids"] = outcome.token_ids
    return ext


def _object(p: Prepared, stream: bool) -> str:
    if p.kind == "chat":
        return "chat.completion.chunk" if stream else "chat.completion"
    return "text_completion"


def _chunk(p: Prepared, delta: dict | str, outcome: Outcome | None = None) -> dict:
    """One streamed chunk: a text delta, or (with ``outcome``) the last one, with the finish reason."""
    finish = None if outcome is None else _finish_reason(outcome)
    if p.kind == "chat":
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    else:
        choice = {"index": 0, "text": delta, "logprobs": None, "finish_reason": finish}
    chunk = {"id": p.id, "object": _object(p, True), "created": p.created, "model": p.model, "choices": [choice]}
    if p.include_usage:
        chunk["usage"] = None
    if outcome is not None:
        chunk["specrun"] = _extension(p, outcome)
    return chunk


def _usage_chunk(p: Prepared, outcome: Outcome) -> dict:
    return {"id": p.id, "object": _object(p, True), "created": p.created, "model": p.model, "choices": [],
            "usage": _usage(p, outcome)}


def _full_response(p: Prepared, outcome: Outcome) -> dict:
    if p.kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": outcome.text, "refusal": None},
                  "logprobs": None, "finish_reason": _finish_reason(outcome)}
    else:
        choice = {"index": 0, "text": outcome.text, "logprobs": None, "finish_reason": _finish_reason(outcome)}
    return {"id": p.id, "object": _object(p, False), "created": p.created, "model": p.model, "choices": [choice],
            "usage": _usage(p, outcome), "specrun": _extension(p, outcome)}


class _CountRequests:
    """Pure ASGI middleware: counts every HTTP response by endpoint and status (streams included)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500

        async def send_counting(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_counting)
        finally:
            self.metrics.requests.labels(endpoint=Metrics.endpoint(scope.get("path", "")), status=str(status)).inc()


class _JSONBodies:
    """Pure ASGI middleware: a POST body is JSON whatever its Content-Type says (``curl -d`` sends
    application/x-www-form-urlencoded), as OpenAI-compatible servers take it."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope.get("method") == "POST":
            headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
            scope = {**scope, "headers": [*headers, (b"content-type", b"application/json")]}
        await self.app(scope, receive, send)
