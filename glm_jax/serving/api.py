"""The OpenAI-compatible HTTP API over the engine (FastAPI), and the chat page.

    app = make_app(model, engine, name="glm")        # model: loading.load_model's LoadedModel
    uvicorn.run(app, host="127.0.0.1", port=8000)    # experiments/serve.py does this

Routes: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health, GET / (the
chat page). Request bodies are validated against models whose bounds come from the model
(max_tokens <= its length limit), so the OpenAPI schema at /openapi.json is exact. Errors are
OpenAI error objects {"error": {"message", "type", "param", "code"}}: 400 for a request the model
cannot take (the prompt too long, a blank for a causal family), 422 for a malformed body or field,
401 without the API key, 404, 413 for a body over the limit, 429 when the queue is full.
"""

import asyncio
import contextlib
import hmac
import json
import secrets
import time
from importlib import resources
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
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


def split_messages(messages) -> tuple[str | None, list[tuple[str, str]], str]:
    """OpenAI messages -> (system text, (query, reply) rounds, the last query). System messages
    may come anywhere before the last message (joined); the rest alternate user / assistant and
    end with a user message."""
    system = "\n".join(m.content for m in messages if m.role == "system") or None
    turns = [m for m in messages if m.role != "system"]
    if not turns or turns[-1].role != "user":
        raise APIError(400, "the last message must have role 'user'", "messages")
    for i, m in enumerate(turns):
        if m.role != ("user" if i % 2 == 0 else "assistant"):
            raise APIError(
                400,
                "after system messages, messages must alternate user / assistant, starting and "
                f"ending with user (message {messages.index(m)} has role {m.role!r})",
                "messages",
            )
    return system, [(q.content, a.content) for q, a in zip(turns[0:-1:2], turns[1:-1:2])], turns[-1].content


def make_app(
    model, engine, name: str = "glm", api_key: str | None = None, max_body: int = MAX_BODY, drain_s: float = 10.0
) -> FastAPI:
    """The app for one loaded model (`train.LoadedModel`) and its `Engine` (started at startup,
    stopped at shutdown: requests in flight get drain_s seconds to finish, then are cancelled)."""
    fam, tok, limit = model.family, model.tokenizer, model.config.max_sequence_length
    stop_ids = tuple(fam.stop_ids(tok))
    created = int(time.time())
    page = resources.files("glm_jax.serving").joinpath("chat.html").read_text(encoding="utf-8")

    Temperature = Field(1.0, ge=0.0, le=2.0, description="0: greedy")
    TopP = Field(1.0, gt=0.0, le=1.0)
    TopK = Field(0, ge=0, le=model.config.vocab_size, description="0: off (an extension of the OpenAI protocol)")
    MaxTokens = Field(
        None, ge=1, le=limit - 1, description=f"at most the model's length limit ({limit}) minus the prompt"
    )
    Stop = Field(None, description="up to 4 strings; the text ends before the first that appears")
    Seed = Field(None, ge=0, le=2**63 - 1, description="the same seed and settings give the same tokens")

    class Strict(BaseModel):
        model_config = ConfigDict(extra="forbid")

    class StreamOptions(Strict):
        include_usage: bool = False

    class Message(Strict):
        role: Literal["system", "user", "assistant"]
        content: str = Field(max_length=max_body)
        name: str | None = None

    class Common(Strict):
        model: str | None = None
        temperature: float = Temperature
        top_p: float = TopP
        top_k: int = TopK
        max_tokens: int | None = MaxTokens
        stop: str | list[str] | None = Stop
        seed: int | None = Seed
        n: int = Field(1, ge=1, le=1, description="one choice per request")
        stream: bool = False
        stream_options: StreamOptions | None = None
        user: str | None = None

    class ChatRequest(Common):
        messages: list[Message] = Field(min_length=1)
        max_completion_tokens: int | None = MaxTokens

    class CompletionRequest(Common):
        prompt: str | list[str] = Field(description="text; [MASK] / [sMASK] / [gMASK] are blanks (prefix families)")
        max_tokens: int | None = Field(16, ge=1, le=limit - 1)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        await run_in_threadpool(engine.stop, drain_s)

    app = FastAPI(
        title="glm_jax", version="1", description="An OpenAI-compatible API for a GLM model", lifespan=lifespan
    )

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return error_response(e.status, e.message, kind=e.kind, param=e.param, code=e.code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, e: RequestValidationError):
        errors = e.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        message = "; ".join(
            f"{'.'.join(str(x) for x in err.get('loc', ()) if x != 'body') or 'body'}: {err.get('msg')}"
            for err in errors[:5]
        )
        return error_response(422, message, param=".".join(loc) or None, code="invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, e: StarletteHTTPException):
        return error_response(
            e.status_code, str(e.detail), kind="invalid_request_error" if e.status_code < 500 else "server_error"
        )

    def check_model(body):
        if body.model not in (None, name):
            raise APIError(
                404,
                f"model {body.model!r} is not served here; GET /v1/models lists {name!r}",
                "model",
                code="model_not_found",
            )

    def stops_of(body) -> list[str]:
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise APIError(422, "stop takes up to 4 non-empty strings", "stop")
        return stops

    def sampling_of(body) -> Sampling:
        return Sampling(body.temperature, body.top_p, body.top_k, body.seed)

    def budget(ids: list[int], requested: int | None, field: str) -> int:
        if requested is None:
            return limit - len(ids)
        if len(ids) + requested > limit:
            raise APIError(
                400,
                f"a prompt of {len(ids)} tokens plus {field}={requested} exceeds the model's length "
                f"limit of {limit} tokens: shorten the prompt or lower {field}",
                field,
                code="context_length_exceeded",
            )
        return requested

    @contextlib.contextmanager
    def engine_errors(param: str):
        """The engine's refusals as HTTP errors: a full queue 429, a prompt it cannot take 400."""
        try:
            yield
        except QueueFull as e:
            raise APIError(429, str(e), kind="rate_limit_error", code="queue_full") from None
        except GenerationError as e:
            raise APIError(400, str(e), param, code="context_length_exceeded") from None

    def usage(prompt: int, completion: int) -> dict:
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    async def generate(request: Request, ids, max_tokens, body, text: TextStream, chunk, final):
        """Run one request on the engine: the response (JSON, or SSE when body.stream). chunk(delta)
        and final(text, finish_reason, usage) build the protocol's objects."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def on_token(t):  # on the engine thread; `text` is touched nowhere else until the request is done
            stopped = text.push(t)
            delta = text.delta()
            if delta:
                loop.call_soon_threadsafe(events.put_nowait, ("delta", delta))
            return stopped

        def on_done(reason, n):
            loop.call_soon_threadsafe(events.put_nowait, ("done", reason, n))

        req = EngineRequest(ids, max_tokens, sampling_of(body), stop_ids, on_token=on_token, on_done=on_done)
        with engine_errors("messages" if hasattr(body, "messages") else "prompt"):
            engine.submit(req)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        if not body.stream:
            try:
                while True:
                    try:
                        event = await asyncio.wait_for(events.get(), 0.5)
                    except TimeoutError:
                        if await request.is_disconnected():
                            engine.cancel(req)
                        continue
                    if event[0] == "done":
                        break
            except asyncio.CancelledError:
                engine.cancel(req)
                raise
            _, reason, n = event
            if reason in ("cancelled", "error"):
                raise APIError(
                    503,
                    "the server is shutting down" if reason == "cancelled" else "generation failed",
                    kind="server_error",
                )
            return JSONResponse(final(text.final(), reason, usage(len(ids), n)))

        async def sse():
            try:
                yield f"data: {json.dumps(chunk(None), ensure_ascii=False)}\n\n"
                while True:
                    event = await events.get()
                    if event[0] == "delta":
                        yield f"data: {json.dumps(chunk(event[1]), ensure_ascii=False)}\n\n"
                        continue
                    _, reason, n = event
                    rest = text.delta(final=True)
                    if rest:
                        yield f"data: {json.dumps(chunk(rest), ensure_ascii=False)}\n\n"
                    if reason in ("cancelled", "error"):
                        body = error_body("generation was cancelled: the server is shutting down", "server_error")
                        yield f"data: {json.dumps(body)}\n\n"
                    else:
                        yield f"data: {json.dumps(chunk(None, reason), ensure_ascii=False)}\n\n"
                    if include_usage:
                        yield f"data: {json.dumps(chunk(None, usage=usage(len(ids), n)))}\n\n"
                    yield "data: [DONE]\n\n"
                    return
            finally:  # the client went away (or we are done): the slot is freed at the next step
                engine.cancel(req)

        return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    # ---- routes ----------------------------------------------------------------------------------
    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index():
        return HTMLResponse(page)

    @app.get("/health")
    async def health():
        if engine.error is not None:
            raise APIError(503, f"the engine stopped: {engine.error}", kind="server_error")
        return {"status": "ok", "model": name, **engine.load()}

    @app.get("/v1/models")
    async def models():
        return {
            "object": "list",
            "data": [
                {
                    "id": name,
                    "object": "model",
                    "created": created,
                    "owned_by": "glm_jax",
                    "max_model_len": limit,
                    "family": fam.name,
                }
            ],
        }

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        check_model(body)
        stops = stops_of(body)
        system, history, query = split_messages(body.messages)
        requested = body.max_completion_tokens or body.max_tokens
        reserve = requested if requested is not None else min(256, limit // 4)
        try:
            ids, dropped = fam.fit_chat(tok, history, query, limit - reserve, system)
        except FamilyError as e:
            raise APIError(400, f"the last message does not fit: {e}", "messages", code="context_length_exceeded")
        max_tokens = budget(ids, requested, "max_tokens")
        rid, now = f"chatcmpl-{secrets.token_hex(12)}", int(time.time())

        def chunk(delta, finish=None, usage=None):
            out = {"id": rid, "object": "chat.completion.chunk", "created": now, "model": name}
            if usage is not None:
                return {**out, "choices": [], "usage": usage}
            d = {} if finish else ({"role": "assistant", "content": ""} if delta is None else {"content": delta})
            return {**out, "choices": [{"index": 0, "delta": d, "finish_reason": finish, "logprobs": None}]}

        def final(text, reason, usage):
            return {
                "id": rid,
                "object": "chat.completion",
                "created": now,
                "model": name,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "finish_reason": reason,
                        "logprobs": None,
                    }
                ],
                "usage": usage,
                "dropped_rounds": dropped,
            }

        text = TextStream(tok.decode, stop_ids, stops, fam.postprocess)
        return await generate(request, ids, max_tokens, body, text, chunk, final)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        check_model(body)
        stops = stops_of(body)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if len(prompts) != 1:
            raise APIError(422, "prompt takes one text per request", "prompt")
        ids = fam.generation_prompt(tok, prompts[0])
        if fam.causal and any(m in prompts[0] for m in ("[MASK]", "[sMASK]")):
            raise APIError(
                400, f"{fam.name} is a causal model: it cannot fill [MASK] blanks; send plain text", "prompt"
            )
        rid, now = f"cmpl-{secrets.token_hex(12)}", int(time.time())

        def chunk(delta, finish=None, usage=None):
            out = {"id": rid, "object": "text_completion", "created": now, "model": name}
            if usage is not None:
                return {**out, "choices": [], "usage": usage}
            return {**out, "choices": [{"index": 0, "text": delta or "", "finish_reason": finish, "logprobs": None}]}

        def final(text, reason, usage, **extra):
            return {
                "id": rid,
                "object": "text_completion",
                "created": now,
                "model": name,
                "choices": [{"index": 0, "text": text, "finish_reason": reason, "logprobs": None, **extra}],
                "usage": usage,
            }

        literal = any(m in prompts[0] for m in ("[MASK]", "[sMASK]", "[gMASK]"))
        if not literal:
            max_tokens = budget(ids, body.max_tokens, "max_tokens")
            return await generate(request, ids, max_tokens, body, TextStream(tok.decode, stop_ids, stops), chunk, final)
        # literal blanks: GLM-130B's generate.py (generate.fill_blanks), each blank on the engine's slots
        if stops:
            raise APIError(400, "stop strings apply to a continuation, not to [MASK] blanks: drop stop", "stop")
        max_tokens = budget(ids, body.max_tokens, "max_tokens")
        gen = EngineGenerator(engine, body.seed)
        with engine_errors("prompt"):
            filled, answers = await run_in_threadpool(
                fill_blanks,
                gen,
                ids,
                max_tokens,
                temperature=body.temperature,
                top_k=body.top_k,
                top_p=body.top_p,
                stop_tokens=stop_ids,
            )
        reason = "length" if "length" in gen.reasons else "stop"
        result = final(
            tok.decode(filled), reason, usage(len(ids), gen.generated), blanks=[tok.decode(a) for a in answers]
        )
        if not body.stream:
            return JSONResponse(result)

        async def sse():
            yield f"data: {json.dumps(chunk(result['choices'][0]['text']), ensure_ascii=False)}\n\n"
            yield f"data: {json.dumps(chunk(None, reason), ensure_ascii=False)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream")

    app.add_middleware(Guard, api_key=api_key, max_body=max_body)
    return app
