"""The HTTP server: a FastAPI app over loaded checkpoints and exports (`scriven.export`), with
the playground at `/`.

    POST /v1/generate    continue a prompt (LSTM or GPT language model); "stream": true for
                         server-sent events, one per token
    POST /v1/translate   translate one sentence or a list; "stream": true for events per token
                         (greedy) and per finished sentence; "attention": true adds the
                         cross-attention weights
    GET  /v1/models      what is served (names, never paths on the server)
    GET  /v1/positions   a positional-encoding table and its position-by-position dot products
    GET  /healthz        liveness, queue lengths
    GET  /docs           OpenAPI documentation (FastAPI's)

Parameters are validated by pydantic (422 naming the field, unknown fields refused); bodies over
`max_body_bytes` get 413; max tokens, samples, beams and sentences are capped; each request has
a timeout (504); a full queue gives 429 with `Retry-After`. Model work runs on one worker thread
per model (see `batching`), never on the event loop; a client that disconnects stops its work.

An export is served through the same routes, decoded by the path `generate` and `translate`
take for it (`LoadedLM.load`, `translator.loaded_translator`). What its runtime cannot give is
said, not left empty: an exported translator's "attention" is `{"available": false, "reason":
...}`, `/v1/models` gives its runtime and `"attention_maps": false`, and `/v1/positions` cannot
read its own table (422).

A request body is read as JSON whatever its content type (curl's `-d` sends a form type). The
Host header must name an allowed host (loopback names by default: a web page elsewhere cannot
reach a local server by DNS rebinding), else 400; with an API key, `/v1/` routes need
`Authorization: Bearer KEY` (else 401).
"""

# No `from __future__ import annotations`: FastAPI must see the request-body classes, which are
# local to `create_app`, as real annotations.
import asyncio
import contextlib
import hmac
import json
import os
import warnings
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from fastapi import FastAPI, Query, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .. import __version__
from .. import checkpoint as ckpt_io
from ..config import check, check_float, check_positive_int
from ..errors import ScrivenError
from ..export import is_export, read_info
from ..generation import LM_KINDS, LoadedLM, encode_prompt, prompt_text
from ..runtimes import CT2Translator
from ..sampling import validate
from ..translator import KIND as TRANSLATOR_KIND
from ..translator import LoadedTranslator, loaded_translator
from .batching import (
    GenerationJob,
    GenerationWorker,
    QueueFull,
    Ticket,
    TranslationJob,
    TranslationWorker,
)

STATIC = Path(__file__).parent / "static"


@dataclass(frozen=True)
class ServeLimits:
    """What one request may ask for, and how much the server takes on at once."""

    max_body_bytes: int = 64 * 1024
    max_prompt_chars: int = 4000
    max_new_tokens: int = 512
    max_samples: int = 4
    max_alternatives: int = 10
    max_beam: int = 8
    max_sentences: int = 32
    max_batch: int = 64       # rows decoded together by one worker step
    max_queue: int = 1024     # waiting requests per model before 429
    request_timeout: float = 60.0  # seconds

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_prompt_chars", "max_new_tokens", "max_samples",
                     "max_beam", "max_sentences", "max_batch", "max_queue"):
            check_positive_int(getattr(self, name), name)
        check_positive_int(self.max_alternatives, "max_alternatives", allow_zero=True)
        check_float(self.request_timeout, "request_timeout", 0.0, 24 * 3600.0, low_open=True)
        check(self.max_samples <= self.max_batch, "max_samples",
              f"must be at most max_batch ({self.max_batch}), got {self.max_samples}")


RUNTIMES = {"onnx": "onnxruntime", "ctranslate2": "ctranslate2"}  # export format -> runtime


@dataclass
class ServedModel:
    name: str
    task: Literal["generate", "translate"]
    kind: str
    loaded: LoadedLM | LoadedTranslator | CT2Translator
    worker: GenerationWorker | TranslationWorker
    export: dict[str, Any] | None = None  # an export's export.json; None for a checkpoint

    def describe(self) -> dict[str, Any]:
        about = {"name": self.name, "task": self.task, "kind": self.kind,
                 "vocab_size": self.loaded.tokenizer.vocab_size,
                 "tokenizer": self.loaded.tokenizer.kind,
                 "attention_maps": self.task == "translate" and self.export is None}
        if self.export is not None:
            # The weights sit in the runtime's own files, unread by scriven: no count.
            return {**about, "runtime": RUNTIMES[self.export["format"]], "parameters": None,
                    "precision": self.export["quantization"], "config": self.export["model"]}
        model = self.loaded.model
        return {**about, "runtime": "pytorch",
                "parameters": sum(p.numel() for p in model.parameters()),
                "precision": getattr(self.loaded, "precision", "fp32"),
                "config": getattr(model.config, "__dict__", {})}


def _name_for(path: Path) -> str:
    if is_export(path):
        return path.resolve().name
    directory = ckpt_io.resolve(path)
    return directory.parent.name if directory.name in ("best", "latest") else directory.name


def _kind_of(path: Path) -> tuple[str, dict[str, Any] | None]:
    """The model kind at `path`, and its export.json if it is an export (checked: a format this
    scriven reads). A directory that is neither is called that: here an export would do as
    well as a checkpoint, so "not a checkpoint" alone would mislead."""
    if is_export(path):
        info = read_info(path)
        return info["kind"], info
    try:
        ckpt_io.resolve(path)
    except ScrivenError:
        if not path.is_dir():
            raise
        raise ScrivenError(f"{path}: neither a scriven checkpoint (no config.json) nor an "
                           "export (no export.json)") from None
    return ckpt_io.load(path).kind, None


def load_models(checkpoints: Sequence[str | Path] | Mapping[str, str | Path], device: str,
                limits: ServeLimits, precision: str = "fp32") -> dict[str, ServedModel]:
    """Load each checkpoint or export and start its worker. Names: the mapping's keys, or
    "NAME=PATH" items, or the run folder's (or export directory's) name (made unique with -2,
    -3, ...)."""
    items: list[tuple[str | None, Path]] = []
    if isinstance(checkpoints, Mapping):
        items = [(str(k), Path(v)) for k, v in checkpoints.items()]
    else:
        for c in checkpoints:
            text = str(c)
            name, sep, path = text.partition("=")
            items.append((name, Path(path)) if sep and name and not Path(text).exists()
                         else (None, Path(text)))
    if not items:
        raise ScrivenError("checkpoints: give at least one checkpoint to serve")
    served: dict[str, ServedModel] = {}
    try:
        for name, path in items:
            kind, export = _kind_of(path)
            base = name or _name_for(path)
            unique, n = base, 2
            while unique in served:
                unique, n = f"{base}-{n}", n + 1
            # The loaders dispatch an export to its runtime, as `generate`/`translate` do.
            if kind in LM_KINDS:
                lm = LoadedLM.load(path, device, precision)
                served[unique] = ServedModel(unique, "generate", kind, lm, GenerationWorker(
                    lm, limits.max_batch, limits.max_queue, unique), export)
            elif kind == TRANSLATOR_KIND:
                tr = loaded_translator(path, device, precision)
                served[unique] = ServedModel(unique, "translate", kind, tr, TranslationWorker(
                    tr, limits.max_batch, limits.max_queue, unique), export)
            else:
                raise ScrivenError(f"checkpoint {path} holds a {kind} model, which cannot be served")
    except BaseException:
        _close(served)
        raise
    return served


def _close(served: Mapping[str, ServedModel]) -> None:
    for m in served.values():
        m.worker.close()


# ---------------------------------------------------------------------------------------------
# Request bodies (built per app, so the caps appear in the OpenAPI schema)


def _request_models(limits: ServeLimits) -> tuple[type[BaseModel], type[BaseModel]]:
    class GenerateRequest(BaseModel):
        """Continue `prompt` with a text generator (parameters as in `scriven generate`)."""

        model_config = ConfigDict(extra="forbid")

        model: str | None = Field(None, description="a served model's name (default: the "
                                                    "first language model)")
        prompt: str = Field(min_length=1, max_length=limits.max_prompt_chars)
        max_new_tokens: int = Field(50, ge=0, le=limits.max_new_tokens)
        temperature: float = Field(1.0, ge=0.0, le=100.0, description="0 = greedy")
        top_k: int | None = Field(None, ge=1)
        top_p: float | None = Field(None, gt=0.0, le=1.0)
        repetition_penalty: float = Field(1.0, gt=0.0, le=100.0, description="1 = off")
        stop: list[str] = Field(default_factory=list, max_length=8,
                                description="strings that end a sample (not included)")
        seed: int | None = Field(None, ge=0, le=2**63 - 1)
        num_samples: int = Field(1, ge=1, le=limits.max_samples)
        alternatives: int = Field(0, ge=0, le=limits.max_alternatives,
                                  description="most likely tokens to report at each step")
        stream: bool = Field(False, description="server-sent events: start, token..., done")

        @field_validator("stop")
        @classmethod
        def _short_stops(cls, value: list[str]) -> list[str]:
            if any(len(s) > 100 for s in value):
                raise ValueError("each stop string must be at most 100 characters")
            return value

    class TranslateRequest(BaseModel):
        """Translate one sentence or a list of sentences (parameters as in `scriven.translate`)."""

        model_config = ConfigDict(extra="forbid")

        model: str | None = Field(None, description="a served translator's name (default: the "
                                                    "first translator)")
        text: str | list[str] = Field(description="a sentence, or a list of them")
        beam: int = Field(1, ge=1, le=limits.max_beam, description="1 = greedy")
        n_best: int = Field(1, ge=1, le=limits.max_beam)
        length_penalty: float = Field(1.0, ge=0.0, le=10.0)
        max_len: int | None = Field(None, ge=1, description="longest output, in tokens")
        attention: bool = Field(False, description="add the cross-attention weights")
        stream: bool = Field(False, description="server-sent events: start, token..., "
                                                "translation..., done")

        @field_validator("text")
        @classmethod
        def _sized(cls, value: str | list[str]) -> str | list[str]:
            sentences = [value] if isinstance(value, str) else value
            if not sentences:
                raise ValueError("give at least one sentence")
            if len(sentences) > limits.max_sentences:
                raise ValueError(f"at most {limits.max_sentences} sentences per request")
            if any(len(s) > limits.max_prompt_chars for s in sentences):
                raise ValueError(f"each sentence must be at most {limits.max_prompt_chars} "
                                 "characters")
            return value

        @model_validator(mode="after")
        def _n_best_within_beam(self) -> BaseModel:
            if self.n_best > self.beam:
                raise ValueError(f"n_best must be at most beam ({self.beam}), got {self.n_best}")
            return self

    return GenerateRequest, TranslateRequest


# ---------------------------------------------------------------------------------------------
# Body size


class _TooLarge(HTTPException):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body is larger than the server's limit of {limit} bytes")


class BodyLimit:
    """ASGI middleware: 413 for bodies over `max_bytes`, by Content-Length before reading, or
    while reading a body sent without one."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            error = _TooLarge(self.max_bytes)
            await JSONResponse({"detail": error.detail}, status_code=413)(scope, receive, send)
            return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _TooLarge(self.max_bytes)  # FastAPI re-raises it as a 413 response
            return message

        await self.app(scope, limited, send)


# ---------------------------------------------------------------------------------------------
# Who may ask

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")


def _host_name(header: str) -> str:
    """The host of a Host header, without its port: `[::1]:8000` -> `::1`."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def _host_allowed(host: str, allowed: Sequence[str]) -> bool:
    for pattern in allowed:
        if pattern == "*" or host == pattern:
            return True
        if pattern.startswith("*.") and host.endswith(pattern[1:]):
            return True
    return False


class Guard:
    """ASGI middleware: the Host header must name an allowed host (400); with an API key, the
    `/v1/` routes need `Authorization: Bearer KEY` (401); POST bodies are read as JSON
    whatever content type they were sent with."""

    def __init__(self, app: ASGIApp, allowed_hosts: Sequence[str], api_key: str | None) -> None:
        self.app = app
        self.allowed = [h.strip().lower().strip("[]") for h in allowed_hosts]
        self.key = api_key.encode() if api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = list(scope.get("headers") or [])
        found = dict(headers)
        host = _host_name(found.get(b"host", b"").decode("latin-1"))
        if not _host_allowed(host, self.allowed):
            await JSONResponse({"detail": f"host {host!r} is not allowed: start the server with "
                                          "--allowed-hosts naming it"},
                               status_code=400)(scope, receive, send)
            return
        if self.key is not None and scope["path"].startswith("/v1/"):
            scheme, _, given = found.get(b"authorization", b"").decode("latin-1").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(),
                                                                     self.key):
                await JSONResponse({"detail": "missing or wrong API key: send "
                                              "'Authorization: Bearer KEY'"}, status_code=401,
                                   headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
                return
        if scope["method"] == "POST" and scope["path"].startswith("/v1/"):
            headers = [(k, v) for k, v in headers if k != b"content-type"]
            headers.append((b"content-type", b"application/json"))
            scope = {**scope, "headers": headers}
        await self.app(scope, receive, send)


# ---------------------------------------------------------------------------------------------
# Events


def _sse(kind: str, data: dict[str, Any]) -> bytes:
    return f"event: {kind}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


def _unprocessable(message: str) -> JSONResponse:
    return JSONResponse({"detail": [{"loc": ["body"], "msg": message, "type": "value_error"}]},
                        status_code=422)


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _stream(ticket: Ticket, head: dict[str, Any], grace: float) -> AsyncIterator[bytes]:
    """start, the worker's events, then done or error. Leaving early (client gone) cancels."""
    try:
        yield _sse("start", head)
        while True:
            try:
                kind, data = await asyncio.wait_for(ticket.queue.get(), ticket.remaining() + grace)
            except asyncio.TimeoutError:
                yield _sse("error", {"status": 504, "detail": "request timed out"})
                return
            if kind == "done":
                data = {**head, **data}
            yield _sse(kind, data)
            if kind in ("done", "error"):
                return
    finally:
        ticket.cancel()


async def _result(ticket: Ticket, request: Request, head: dict[str, Any],
                  grace: float) -> Response:
    """The final event as a JSON response; a client that disconnects first cancels the work."""
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    getter = asyncio.ensure_future(ticket.queue.get())
    try:
        done, _ = await asyncio.wait({getter, watcher}, timeout=ticket.remaining() + grace,
                                     return_when=asyncio.FIRST_COMPLETED)
        if getter in done:
            kind, data = getter.result()
            if kind == "done":
                return JSONResponse({**head, **data})
            return JSONResponse({"detail": data["detail"]}, status_code=data["status"])
        if watcher in done:
            return Response(status_code=499)  # nobody is listening
        return JSONResponse({"detail": "request timed out"}, status_code=504)
    finally:
        ticket.cancel()
        for task in (watcher, getter):
            task.cancel()


# ---------------------------------------------------------------------------------------------
# Answers shared by the routes

# A worker ends a timed-out request itself (504 from the worker); the route waits this much
# longer for its word before answering 504 on its own.
GRACE = 5.0


def _pick(served: Mapping[str, ServedModel], name: str | None,
          task: str) -> ServedModel | JSONResponse:
    """The model `name` (default: the first for `task`), or the error response to send."""
    if name is None:
        for m in served.values():
            if m.task == task:
                return m
        return JSONResponse({"detail": f"no model for {task} is being served"}, status_code=404)
    if name not in served:
        return JSONResponse({"detail": f"model {name!r} is not served; served: "
                                       f"{', '.join(served)}"}, status_code=404)
    if served[name].task != task:
        return _unprocessable(f"model {name!r} is a {served[name].task} model, not a {task} one")
    return served[name]


def _submit(m: ServedModel, job: GenerationJob | TranslationJob) -> JSONResponse | None:
    """Queue `job`; the refusal to send when the queue is full, else None."""
    try:
        m.worker.submit(job)
    except QueueFull as e:
        # 429, not 503: the server is well, this client should come back shortly.
        return JSONResponse({"detail": f"server busy: {e}"}, status_code=429,
                            headers={"Retry-After": "1"})
    return None


def _event_stream(ticket: Ticket, head: dict[str, Any]) -> StreamingResponse:
    return StreamingResponse(_stream(ticket, head, GRACE), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _answer(ticket: Ticket, request: Request, head: dict[str, Any],
                  stream: bool) -> Response:
    if stream:
        return _event_stream(ticket, head)
    return await _result(ticket, request, head, GRACE)


# ---------------------------------------------------------------------------------------------
# Routes, by concern


def _add_playground(app: FastAPI) -> None:
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    async def playground() -> FileResponse:
        return FileResponse(STATIC / "index.html")


def _add_status_routes(app: FastAPI, served: Mapping[str, ServedModel],
                       limits: ServeLimits) -> None:
    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "version": __version__,
                "models": {name: {"task": m.task, "active": m.worker.active,
                                  "queued": m.worker.queued, **m.worker.stats()}
                           for name, m in served.items()}}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"models": [m.describe() for m in served.values()],
                "limits": limits.__dict__}


def _add_generation_route(app: FastAPI, served: Mapping[str, ServedModel], limits: ServeLimits,
                          GenerateRequest: type[BaseModel]) -> None:
    @app.post("/v1/generate", responses={200: {"content": {"text/event-stream": {}}}})
    async def generate(body: GenerateRequest, request: Request) -> Response:  # type: ignore[valid-type]
        m = _pick(served, body.model, "generate")
        if isinstance(m, JSONResponse):
            return m
        tok = m.loaded.tokenizer
        try:
            validate(body.temperature, body.top_k, body.top_p, body.repetition_penalty,
                     tok.vocab_size)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                ids = encode_prompt(tok, body.prompt)
        except ScrivenError as e:
            return _unprocessable(str(e))
        ticket = Ticket(body.stream, limits.request_timeout)
        job = GenerationJob(ticket, ids, body.max_new_tokens, body.temperature, body.top_k,
                            body.top_p, body.repetition_penalty, tuple(s for s in body.stop if s),
                            body.seed, body.num_samples, body.alternatives)
        refused = _submit(m, job)
        if refused:
            return refused
        head = {"model": m.name, "prompt": prompt_text(tok, body.prompt, ids),
                "prompt_tokens": len(ids), "warnings": [str(w.message) for w in caught]}
        return await _answer(ticket, request, head, body.stream)


def _add_translation_route(app: FastAPI, served: Mapping[str, ServedModel], limits: ServeLimits,
                           TranslateRequest: type[BaseModel]) -> None:
    @app.post("/v1/translate", responses={200: {"content": {"text/event-stream": {}}}})
    async def translate(body: TranslateRequest, request: Request) -> Response:  # type: ignore[valid-type]
        m = _pick(served, body.model, "translate")
        if isinstance(m, JSONResponse):
            return m
        tr = m.loaded
        assert isinstance(tr, (LoadedTranslator, CT2Translator))
        texts = [body.text] if isinstance(body.text, str) else list(body.text)
        names = ["text"] if isinstance(body.text, str) else [f"text[{i}]" for i in range(len(texts))]
        if body.max_len is not None and body.max_len > tr.max_len:
            return _unprocessable(f"max_len must be at most the model's max_len ({tr.max_len}), "
                                  f"got {body.max_len}")
        try:
            ids, cut = tr.encode_sources(texts, names)
        except ScrivenError as e:
            return _unprocessable(str(e))
        ticket = Ticket(body.stream, limits.request_timeout)
        job = TranslationJob(ticket, ids, texts, body.beam, body.n_best, body.length_penalty,
                             body.max_len, body.attention)
        refused = _submit(m, job)
        if refused:
            return refused
        head = {"model": m.name, "sentences": len(texts),
                "warnings": [f"{names[i]} is longer than the model's max_len ({tr.max_len} "
                             "tokens) and was cut" for i in cut]}
        return await _answer(ticket, request, head, body.stream)


def _add_positions_route(app: FastAPI, served: Mapping[str, ServedModel]) -> None:
    @app.get("/v1/positions")
    async def positions(length: int = Query(64, ge=1, le=512),
                        dims: int = Query(64, ge=2, le=1024),
                        model: str | None = Query(None, description="a translator: its own "
                                                  "table (its d_model)")) -> Response:
        source: Any = None
        if model is not None:
            m = _pick(served, model, "translate")
            if isinstance(m, JSONResponse):
                return m
            if m.export is not None:
                return _unprocessable(f"model {model!r} is a {m.export['format']} export, whose "
                                      "position table stays inside the runtime's files; leave "
                                      "out model for the formula's table")
            source = m.loaded
        # Up to 512 x 1,024 numbers and their 512 x 512 products: built and serialised in a
        # worker thread, so that streams on the event loop do not stall meanwhile.
        body = await asyncio.to_thread(_positions_body, length, dims, source)
        return Response(body, media_type="application/json")


def _positions_body(length: int, dims: int, source: Any) -> bytes:
    from ..plots import positional_encoding

    table = positional_encoding(length, dims, source).double()              # (L, D)
    similarity = table @ table.T                                            # (L, L)
    return json.dumps({
        "length": table.size(0), "dims": table.size(1),
        "encoding": (table * 1e4).round().div(1e4).tolist(),
        "similarity": (similarity * 1e3).round().div(1e3).tolist(),
        "formula": "PE[p, 2i] = sin(p / 10000^(2i/d)), PE[p, 2i+1] = cos(p / 10000^(2i/d))"
        if source is None or getattr(source.model, "src_pos", None) is None
        else "learned"}).encode()


# ---------------------------------------------------------------------------------------------
# The app


def _checked_hosts(allowed_hosts: Sequence[str] | None, api_key: str | None) -> list[str]:
    """The Host names to answer (loopback by default), once the access settings are valid."""
    hosts = list(LOOPBACK_HOSTS if allowed_hosts is None else allowed_hosts)
    check(all(isinstance(h, str) and h.strip() for h in hosts) and hosts, "allowed_hosts",
          f"must be one or more host names, got {hosts!r}")
    check(api_key is None or (isinstance(api_key, str) and len(api_key) >= 8), "api_key",
          "must be at least 8 characters")
    return hosts


def create_app(checkpoints: Sequence[str | Path] | Mapping[str, str | Path],
               device: str = "auto", limits: ServeLimits | None = None,
               precision: str = "fp32", allowed_hosts: Sequence[str] | None = None,
               api_key: str | None = None) -> FastAPI:
    """A FastAPI app serving the given checkpoints and exports (language models and translators;
    see the module docstring for the routes). `precision` is how generators and translators
    hold their weights (see `scriven.precision`). `allowed_hosts`: Host header names accepted (default:
    loopback names; `*.example.com` and `*` work); `api_key`: required as a bearer token on the
    `/v1/` routes. Loading happens now; the workers stop when the app shuts down. It changes no
    process-wide setting (torch's thread count is the caller's: see `serve`)."""
    limits = limits or ServeLimits()
    hosts = _checked_hosts(allowed_hosts, api_key)
    served = load_models(checkpoints, device, limits, precision)
    GenerateRequest, TranslateRequest = _request_models(limits)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await asyncio.to_thread(_close, served)

    app = FastAPI(title="scriven", version=__version__, lifespan=lifespan,
                  description="Generate text and translate with scriven checkpoints. "
                              "The playground is at /.")
    app.state.models = served
    app.state.limits = limits
    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes)
    app.add_middleware(Guard, allowed_hosts=hosts, api_key=api_key)  # outermost: runs first
    _add_playground(app)
    _add_status_routes(app, served, limits)
    _add_generation_route(app, served, limits, GenerateRequest)
    _add_translation_route(app, served, limits, TranslateRequest)
    _add_positions_route(app, served)
    return app


def serve(checkpoints: Sequence[str | Path], host: str = "127.0.0.1", port: int = 8000,
          device: str = "auto", limits: ServeLimits | None = None, threads: int | None = None,
          log_level: str = "warning", precision: str = "fp32",
          allowed_hosts: Sequence[str] | None = None, api_key: str | None = None) -> None:
    """Run the server until interrupted (Ctrl-C). `threads` sets torch's intra-op threads for
    this process (the server's workers already run in parallel, one per model). `allowed_hosts`
    defaults to the loopback names plus `host` when that is one address; `api_key` defaults to
    $SCRIVEN_API_KEY."""
    import uvicorn
    check_positive_int(port, "port", allow_zero=True)
    check(port < 65536, "port", f"must be below 65536, got {port}")
    if threads is not None:  # process-wide, so set here where the process starts
        check_positive_int(threads, "threads")
        torch.set_num_threads(threads)
    if allowed_hosts is None:
        allowed_hosts = list(LOOPBACK_HOSTS)
        if host not in ("0.0.0.0", "::", ""):
            allowed_hosts.append(host)
    if api_key is None:
        api_key = os.environ.get("SCRIVEN_API_KEY") or None
    app = create_app(checkpoints, device, limits, precision, allowed_hosts, api_key)
    shown = f"[{host}]" if ":" in host else host
    print(f"scriven serving {', '.join(app.state.models)} on http://{shown}:{port}/ "
          f"(docs at /docs)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)


__all__ = ["ServeLimits", "create_app", "load_models", "serve"]
