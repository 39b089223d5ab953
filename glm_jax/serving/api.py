"""The OpenAI-compatible HTTP API over the engine (FastAPI), and the chat page.

    app = make_app(model, engine, name="glm")        # model: loading.load_model's LoadedModel
    uvicorn.run(app, host="127.0.0.1", port=8000)    # experiments/serve.py does this

Routes: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health, GET / (the
chat page), one `Routes` method each; `make_app` wires them with the error handlers. Request bodies
are validated against models whose bounds come from the model (`request_models`: max_tokens <= its
length limit), so the OpenAPI schema at /openapi.json is exact. Errors are
OpenAI error objects {"error": {"message", "type", "param", "code"}}: 400 for a request the model
cannot take (the prompt too long, a blank for a causal family), 422 for a malformed body or field,
401 without the API key, 404, 413 for a body over the limit, 429 when the queue is full.
"""

import asyncio
import contextlib
import dataclasses
import hmac
import json
import secrets
import time
from importlib import resources
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, create_model
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from glm_jax.families import FamilyError
from glm_jax.generate import GenerationError, fill_blanks
from glm_jax.serving.engine import EngineGenerator, QueueFull, Sampling
from glm_jax.serving.engine import Request as EngineRequest
from glm_jax.serving.text import TextStream

MAX_BODY = 1 << 20  # bytes


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        kind: str = "invalid_request_error",
        code: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None, code: str | None = None):
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(status: int, message: str, **kw) -> JSONResponse:
    return JSONResponse(error_body(message, **kw), status_code=status)


class Guard:
    """ASGI middleware before any parsing: the API key (every route but the page) and the body limit."""

    def __init__(self, app, api_key: str | None, max_body: int):
        self.app, self.api_key, self.max_body = app, api_key, max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.api_key and scope["path"] != "/":
            given = headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
                return await error_response(
                    401,
                    "a valid API key is required: send 'Authorization: Bearer KEY'",
                    kind="authentication_error",
                    code="invalid_api_key",
                )(scope, receive, send)
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body:
            return await self._too_large(scope, receive, send)
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_body:
                return await self._too_large(scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)

    async def _too_large(self, scope, receive, send):
        await error_response(413, f"the request body is over {self.max_body} bytes", code="body_too_large")(
            scope, receive, send
        )


# ---- request bodies -----------------------------------------------------------------------------
# The bounds that depend on the model (max_tokens, top_k, a message's length) are set by
# `request_models`, so /openapi.json states them exactly.
class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(Strict):
    include_usage: bool = False


class Message(Strict):
    role: Literal["system", "user", "assistant"]
    content: str  # at most the body limit (`request_models`)
    name: str | None = None


class Common(Strict):
    model: str | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0: greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, description="0: off (an extension of the OpenAI protocol)")
    max_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = Field(
        None, description="up to 4 strings; the text ends before the first that appears"
    )
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="the same seed and settings give the same tokens")
    n: int = Field(1, ge=1, le=1, description="one choice per request")
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None


class ChatRequest(Common):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class CompletionRequest(Common):
    prompt: str | list[str] = Field(description="text; [MASK] / [sMASK] / [gMASK] are blanks (prefix families)")
    max_tokens: int | None = Field(16, ge=1)


def request_models(max_len: int, vocab_size: int, max_body: int) -> tuple[type[ChatRequest], type[CompletionRequest]]:
    """ChatRequest and CompletionRequest bounded for one model: max_tokens (and max_completion_tokens)
    <= max_len - 1, top_k <= vocab_size, a message's content <= max_body characters."""

    within_limit = f"at most the model's length limit ({max_len}) minus the prompt"

    def tokens(default: int | None, description: str | None = None):
        return (int | None, Field(default, ge=1, le=max_len - 1, description=description))

    top_k = (int, Field(0, ge=0, le=vocab_size, description="0: off (an extension of the OpenAI protocol)"))
    message = create_model("Message", __base__=Message, content=(str, Field(max_length=max_body)))
    chat = create_model(
        "ChatRequest",
        __base__=ChatRequest,
        top_k=top_k,
        max_tokens=tokens(None, within_limit),
        messages=(list[message], Field(min_length=1)),
        max_completion_tokens=tokens(None, within_limit),
    )
    completion = create_model("CompletionRequest", __base__=CompletionRequest, top_k=top_k, max_tokens=tokens(16))
    return chat, completion


def split_messages(messages) -> tuple[str | None, list[tuple[str, str]], str]:
    """OpenAI messages -> (system text, (query, reply) rounds, the last query). System messages
    may come anywhere before the last message (joined); the rest alternate user / assistant and
    end with a user message."""
    system = "\n".join(message.content for message in messages if message.role == "system") or None
    turns = [message for message in messages if message.role != "system"]
    if not turns or turns[-1].role != "user":
        raise APIError(400, "the last message must have role 'user'", "messages")
    for i, message in enumerate(turns):
        if message.role != ("user" if i % 2 == 0 else "assistant"):
            raise APIError(
                400,
                "after system messages, messages must alternate user / assistant, starting and "
                f"ending with user (message {messages.index(message)} has role {message.role!r})",
                "messages",
            )
    rounds = [(query.content, reply.content) for query, reply in zip(turns[0:-1:2], turns[1:-1:2])]
    return system, rounds, turns[-1].content


def stops_of(body) -> list[str]:
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stops) > 4 or any(not stop for stop in stops):
        raise APIError(422, "stop takes up to 4 non-empty strings", "stop")
    return stops


def sampling_of(body) -> Sampling:
    return Sampling(body.temperature, body.top_p, body.top_k, body.seed)


def usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


@contextlib.contextmanager
def engine_errors(param: str):
    """The engine's refusals as HTTP errors: a full queue 429, a prompt it cannot take 400."""
    try:
        yield
    except QueueFull as e:
        raise APIError(429, str(e), kind="rate_limit_error", code="queue_full") from None
    except GenerationError as e:
        raise APIError(400, str(e), param, code="context_length_exceeded") from None


# ---- responses ------------------------------------------------------------------------------------
def sse(payload: dict, ensure_ascii: bool = False) -> str:
    """One server-sent event."""
    return f"data: {json.dumps(payload, ensure_ascii=ensure_ascii)}\n\n"


@dataclasses.dataclass(frozen=True)
class ChatReply:
    """The chat protocol's objects of one response."""

    id: str
    created: int
    model: str
    dropped_rounds: int  # history rounds dropped to fit the prompt

    def chunk(self, delta: str | None, finish: str | None = None, usage: dict | None = None) -> dict:
        """A stream chunk: the role (delta None), a content delta, the finish reason, or the usage."""
        head = {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model}
        if usage is not None:
            return {**head, "choices": [], "usage": usage}
        if finish:
            change = {}
        else:
            change = {"role": "assistant", "content": ""} if delta is None else {"content": delta}
        return {**head, "choices": [{"index": 0, "delta": change, "finish_reason": finish, "logprobs": None}]}

    def final(self, text: str, reason: str, usage: dict) -> dict:
        """The whole (non-streamed) response."""
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": reason,
                    "logprobs": None,
                }
            ],
            "usage": usage,
            "dropped_rounds": self.dropped_rounds,
        }


@dataclasses.dataclass(frozen=True)
class CompletionReply:
    """The completion protocol's objects of one response."""

    id: str
    created: int
    model: str

    def chunk(self, delta: str | None, finish: str | None = None, usage: dict | None = None) -> dict:
        """A stream chunk: a text delta (none for the first and the finish chunk), or the usage."""
        head = {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model}
        if usage is not None:
            return {**head, "choices": [], "usage": usage}
        return {**head, "choices": [{"index": 0, "text": delta or "", "finish_reason": finish, "logprobs": None}]}

    def final(self, text: str, reason: str, usage: dict, **extra) -> dict:
        """The whole response; extra: more fields of its choice (the blanks)."""
        return {
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "text": text, "finish_reason": reason, "logprobs": None, **extra}],
            "usage": usage,
        }


async def whole_text_events(reply: CompletionReply, text: str, reason: str):
    """A stream of an answer known at once (filled blanks): its text, the finish chunk, [DONE]."""
    yield sse(reply.chunk(text))
    yield sse(reply.chunk(None, reason))
    yield "data: [DONE]\n\n"


# ---- error handlers -------------------------------------------------------------------------------
async def on_api_error(request, e: APIError):
    return error_response(e.status, e.message, kind=e.kind, param=e.param, code=e.code)


def error_location(error: dict) -> str:
    """A validation error's field path without the leading "body"."""
    return ".".join(str(part) for part in error.get("loc", ()) if part != "body")


async def on_invalid_request(request, e: RequestValidationError):
    errors = e.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    message = "; ".join(f"{error_location(error) or 'body'}: {error.get('msg')}" for error in errors[:5])
    return error_response(422, message, param=error_location(first) or None, code="invalid_value")


async def on_http_error(request, e: StarletteHTTPException):
    return error_response(
        e.status_code, str(e.detail), kind="invalid_request_error" if e.status_code < 500 else "server_error"
    )


# ---- routes ---------------------------------------------------------------------------------------
class Routes:
    """The routes of one loaded model (`loading.LoadedModel`: config, family, tokenizer), served as
    `name` by its engine. The GET routes are these methods themselves, so they carry comments, not
    docstrings: FastAPI would put a docstring in /openapi.json."""

    def __init__(self, model, engine, name: str):
        self.engine, self.name = engine, name
        self.family, self.tokenizer, self.limit = model.family, model.tokenizer, model.config.max_sequence_length
        self.stop_ids = tuple(self.family.stop_ids(self.tokenizer))
        self.created = int(time.time())
        self.page = resources.files("glm_jax.serving").joinpath("chat.html").read_text(encoding="utf-8")

    async def index(self):  # GET /: the chat page
        return HTMLResponse(self.page)

    async def health(self):  # GET /health: the engine's load
        if self.engine.error is not None:
            raise APIError(503, f"the engine stopped: {self.engine.error}", kind="server_error")
        return {"status": "ok", "model": self.name, **self.engine.load()}

    async def models(self):  # GET /v1/models
        model = {
            "id": self.name,
            "object": "model",
            "created": self.created,
            "owned_by": "glm_jax",
            "max_model_len": self.limit,
            "family": self.family.name,
        }
        return {"object": "list", "data": [model]}

    async def chat_completions(self, body: ChatRequest, request: Request):
        """POST /v1/chat/completions: the family's chat prompt, its oldest rounds dropped to leave
        room for the reply (400 if the last message alone does not fit), run on the engine."""
        self.check_model(body)
        stops = stops_of(body)
        system, history, query = split_messages(body.messages)
        requested = body.max_completion_tokens or body.max_tokens
        reserve = requested if requested is not None else min(256, self.limit // 4)
        try:
            ids, dropped = self.family.fit_chat(self.tokenizer, history, query, self.limit - reserve, system)
        except FamilyError as e:
            raise APIError(400, f"the last message does not fit: {e}", "messages", code="context_length_exceeded")
        max_tokens = self.budget(ids, requested, "max_tokens")
        reply = ChatReply(f"chatcmpl-{secrets.token_hex(12)}", int(time.time()), self.name, dropped)
        text = TextStream(self.tokenizer.decode, self.stop_ids, stops, self.family.postprocess)
        return await self.run(request, ids, max_tokens, body, text, reply)

    async def completions(self, body: CompletionRequest, request: Request):
        """POST /v1/completions: one prompt, continued, or with literal blanks filled (`fill_blanks`)."""
        self.check_model(body)
        stops = stops_of(body)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if len(prompts) != 1:
            raise APIError(422, "prompt takes one text per request", "prompt")
        ids = self.family.generation_prompt(self.tokenizer, prompts[0])
        if self.family.causal and any(mask in prompts[0] for mask in ("[MASK]", "[sMASK]")):
            raise APIError(
                400, f"{self.family.name} is a causal model: it cannot fill [MASK] blanks; send plain text", "prompt"
            )
        reply = CompletionReply(f"cmpl-{secrets.token_hex(12)}", int(time.time()), self.name)
        if not any(mask in prompts[0] for mask in ("[MASK]", "[sMASK]", "[gMASK]")):
            max_tokens = self.budget(ids, body.max_tokens, "max_tokens")
            text = TextStream(self.tokenizer.decode, self.stop_ids, stops)
            return await self.run(request, ids, max_tokens, body, text, reply)
        if stops:
            raise APIError(400, "stop strings apply to a continuation, not to [MASK] blanks: drop stop", "stop")
        return await self.fill_blanks(body, ids, reply)

    # ---- helpers of the routes ---------------------------------------------------------------------
    def check_model(self, body):
        if body.model not in (None, self.name):
            raise APIError(
                404,
                f"model {body.model!r} is not served here; GET /v1/models lists {self.name!r}",
                "model",
                code="model_not_found",
            )

    def budget(self, ids: list[int], requested: int | None, field: str) -> int:
        """The tokens to generate: `requested`, or all the room the prompt leaves (400 if it does not fit)."""
        if requested is None:
            return self.limit - len(ids)
        if len(ids) + requested > self.limit:
            raise APIError(
                400,
                f"a prompt of {len(ids)} tokens plus {field}={requested} exceeds the model's length "
                f"limit of {self.limit} tokens: shorten the prompt or lower {field}",
                field,
                code="context_length_exceeded",
            )
        return requested

    async def fill_blanks(self, body, ids: list[int], reply: CompletionReply):
        """Literal blanks: GLM-130B's generate.py (`generate.fill_blanks`), each blank on the
        engine's slots; the whole text at once (one chunk when streamed), the blanks beside it."""
        max_tokens = self.budget(ids, body.max_tokens, "max_tokens")
        gen = EngineGenerator(self.engine, body.seed)
        with engine_errors("prompt"):
            filled, answers = await run_in_threadpool(
                fill_blanks,
                gen,
                ids,
                max_tokens,
                temperature=body.temperature,
                top_k=body.top_k,
                top_p=body.top_p,
                stop_tokens=self.stop_ids,
            )
        reason = "length" if "length" in gen.reasons else "stop"
        blanks = [self.tokenizer.decode(answer) for answer in answers]
        result = reply.final(self.tokenizer.decode(filled), reason, usage(len(ids), gen.generated), blanks=blanks)
        if not body.stream:
            return JSONResponse(result)
        return StreamingResponse(
            whole_text_events(reply, result["choices"][0]["text"], reason), media_type="text/event-stream"
        )

    async def run(self, request: Request, ids: list[int], max_tokens: int, body, text: TextStream, reply):
        """Run one request on the engine -> the response: JSON, or SSE when body.stream. reply: the
        protocol's objects (`ChatReply` / `CompletionReply`)."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def on_token(token):  # on the engine thread; `text` is touched nowhere else until the request is done
            stopped = text.push(token)
            delta = text.delta()
            if delta:
                loop.call_soon_threadsafe(events.put_nowait, ("delta", delta))
            return stopped

        def on_done(reason, generated):
            loop.call_soon_threadsafe(events.put_nowait, ("done", reason, generated))

        req = EngineRequest(ids, max_tokens, sampling_of(body), self.stop_ids, on_token=on_token, on_done=on_done)
        with engine_errors("messages" if hasattr(body, "messages") else "prompt"):
            self.engine.submit(req)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        if not body.stream:
            reason, generated = await self.wait(request, req, events)
            return JSONResponse(reply.final(text.final(), reason, usage(len(ids), generated)))
        stream = self.stream(req, events, text, reply, len(ids), include_usage)
        return StreamingResponse(stream, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def wait(self, request: Request, req: EngineRequest, events: asyncio.Queue) -> tuple[str, int]:
        """Wait for a request's end (cancelling it when the client goes away) -> (finish_reason,
        ids generated); 503 when it was cancelled (shutdown) or failed."""
        try:
            while True:
                try:
                    event = await asyncio.wait_for(events.get(), 0.5)
                except TimeoutError:
                    if await request.is_disconnected():
                        self.engine.cancel(req)
                    continue
                if event[0] == "done":
                    break
        except asyncio.CancelledError:
            self.engine.cancel(req)
            raise
        _, reason, generated = event
        if reason in ("cancelled", "error"):
            raise APIError(
                503,
                "the server is shutting down" if reason == "cancelled" else "generation failed",
                kind="server_error",
            )
        return reason, generated

    async def stream(self, req: EngineRequest, events: asyncio.Queue, text, reply, prompt_tokens, include_usage):
        """The SSE events of a request: the first chunk, one per text delta, the rest of the text,
        the finish chunk (an error event if it was cancelled or failed), the usage if asked, [DONE]."""
        try:
            yield sse(reply.chunk(None))
            while True:
                event = await events.get()
                if event[0] == "delta":
                    yield sse(reply.chunk(event[1]))
                    continue
                _, reason, generated = event
                rest = text.delta(final=True)
                if rest:
                    yield sse(reply.chunk(rest))
                if reason in ("cancelled", "error"):
                    message = "generation was cancelled: the server is shutting down"
                    yield sse(error_body(message, "server_error"), ensure_ascii=True)
                else:
                    yield sse(reply.chunk(None, reason))
                if include_usage:
                    yield sse(reply.chunk(None, usage=usage(prompt_tokens, generated)), ensure_ascii=True)
                yield "data: [DONE]\n\n"
                return
        finally:  # the client went away (or we are done): the slot is freed at the next step
            self.engine.cancel(req)


def engine_lifespan(engine, drain_s: float):
    """The app's lifespan: the engine starts with the app; at shutdown requests in flight get
    drain_s seconds to finish, then are cancelled."""

    @contextlib.asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        await run_in_threadpool(engine.stop, drain_s)

    return lifespan


def make_app(
    model, engine, name: str = "glm", api_key: str | None = None, max_body: int = MAX_BODY, drain_s: float = 10.0
) -> FastAPI:
    """The app for one loaded model (`loading.LoadedModel`) and its `Engine` (started at startup,
    stopped at shutdown: requests in flight get drain_s seconds to finish, then are cancelled)."""
    routes = Routes(model, engine, name)
    chat_request, completion_request = request_models(
        model.config.max_sequence_length, model.config.vocab_size, max_body
    )
    app = FastAPI(
        title="glm_jax",
        version="1",
        description="An OpenAI-compatible API for a GLM model",
        lifespan=engine_lifespan(engine, drain_s),
    )
    app.add_exception_handler(APIError, on_api_error)
    app.add_exception_handler(RequestValidationError, on_invalid_request)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.get("/", response_class=HTMLResponse, include_in_schema=False)(routes.index)
    app.get("/health")(routes.health)
    app.get("/v1/models")(routes.models)

    @app.post("/v1/chat/completions")  # the body model is the one bounded for this model
    async def chat_completions(body: chat_request, request: Request):
        return await routes.chat_completions(body, request)

    @app.post("/v1/completions")
    async def completions(body: completion_request, request: Request):
        return await routes.completions(body, request)

    app.add_middleware(Guard, api_key=api_key, max_body=max_body)
    return app
