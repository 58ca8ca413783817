"""The OpenAI-compatible HTTP API of `loraforge serve` (FastAPI): /v1/models, /v1/chat/completions (streamed as
server-sent events or not), /v1/completions and /health. Every bad request gets OpenAI's error shape and a 4xx."""

import asyncio
import json
import secrets
import time

from loraforge.errors import LoraforgeError
from loraforge.eval.generate import prompt_ids
from loraforge.serve.engine import Engine, Job
from loraforge.serve.models import Served

MAX_BODY_BYTES = 1 << 20
MAX_STOP = 256
ROLES = ("system", "user", "assistant")
# OpenAI parameters this server does not carry out, with the values that ask for nothing (clients send those).
NOT_SUPPORTED = {"logprobs": (None, False), "top_logprobs": (None, 0), "echo": (None, False), "best_of": (None, 1),
                 "tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []),
                 "function_call": (None, "none"), "response_format": (None, {"type": "text"}), "logit_bias": (None, {}),
                 "frequency_penalty": (None, 0), "presence_penalty": (None, 0), "suffix": (None, "")}


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind


def error_body(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error") -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


def _number(body: dict, key: str, default: float, low: float, high: float) -> float:
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ApiError(400, f"{key} must be a number from {low:g} to {high:g}, got {value!r}", key)
    return float(value)


def _integer(body: dict, key: str, default, low: int, high: int = 2**63 - 1) -> int | None:
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ApiError(400, f"{key} must be an integer from {low} to {high}, got {value!r}", key)
    return value


def _stop(body: dict) -> list[str]:
    value = body.get("stop")
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or len(stops) > 4 or not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP
                                                                 for s in stops):
        raise ApiError(400, f"stop must be a string or a list of up to 4 strings of 1 to {MAX_STOP} characters", "stop")
    return stops


def _messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list of {role, content} objects", "messages")
    out = []
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise ApiError(400, f"{where} must be an object with role and content", where)
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise ApiError(400, f"{where}.role is {role!r}; use one of {', '.join(ROLES)}", f"{where}.role")
        if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                             and isinstance(p.get("text"), str) for p in content):
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise ApiError(400, f"{where}.content must be text (or a list of text parts)", f"{where}.content")
        out.append({"role": role, "content": content})
    return out


class Api:
    def __init__(self, served: dict[str, Served], engine: Engine, api_key: str | None, timeout_s: float):
        self.served, self.engine, self.api_key, self.timeout_s = served, engine, api_key, timeout_s
        self.created = int(time.time())

    def model(self, body: dict) -> Served:
        name = body.get("model")
        if name is None:
            raise ApiError(400, f"model is required: one of {', '.join(self.served)}", "model")
        if not isinstance(name, str):
            raise ApiError(400, f"model must be text, one of {', '.join(self.served)}", "model")
        if name not in self.served:
            raise ApiError(404, f"model {name!r} is not served here; the models are {', '.join(self.served)}",
                           "model", "model_not_found")
        return self.served[name]

    def job(self, body: dict, served: Served, ids: list[int], deliver, asked: str) -> Job:
        """asked: the request's field that holds the prompt (messages or prompt), named when it is too long."""
        for key, nothing in NOT_SUPPORTED.items():
            if body.get(key) not in nothing:
                raise ApiError(400, f"{key} is not supported by this server; leave it out", key)
        if body.get("n") not in (None, 1):
            raise ApiError(400, "n must be 1: one answer per request", "n")
        room = served.base.context - len(ids)
        max_tokens = _integer(body, "max_tokens", None, 1) or _integer(body, "max_completion_tokens", None, 1)
        if room < 1:
            raise ApiError(400, f"the prompt's {len(ids)} tokens fill the model's context of "
                                f"{served.base.context}; shorten it", asked)
        if max_tokens is not None and max_tokens > room:
            raise ApiError(400, f"max_tokens {max_tokens} with a prompt of {len(ids)} tokens passes the model's "
                                f"context of {served.base.context} tokens; ask for at most {room}", "max_tokens")
        return Job(served, ids, max_tokens or min(served.max_new_tokens, room),
                   temperature=_number(body, "temperature", 1.0, 0, 2), top_p=_number(body, "top_p", 1.0, 0.0001, 1),
                   stop=_stop(body), seed=_integer(body, "seed", None, 0), deliver=deliver)


def build_app(served: dict[str, Served], engine: Engine, api_key: str | None = None, timeout_s: float = 300.0):
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException

    api = Api(served, engine, api_key, timeout_s)
    app = FastAPI(title="loraforge serve", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return JSONResponse(error_body(exc.status, exc.message, exc.param, exc.kind), status_code=exc.status)

    @app.exception_handler(HTTPException)
    async def _http_error(request, exc: HTTPException):
        return JSONResponse(error_body(exc.status_code, str(exc.detail)), status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc):
        return JSONResponse(error_body(400, str(exc)), status_code=400)

    @app.middleware("http")
    async def _guard(request: Request, call_next):
        if api.api_key is not None and request.url.path != "/health":
            given = request.headers.get("authorization", "")
            if not secrets.compare_digest(given.encode(), f"Bearer {api.api_key}".encode()):
                return JSONResponse(error_body(401, "missing or wrong API key; send Authorization: Bearer KEY",
                                               kind="authentication_error"), status_code=401)
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY_BYTES):
            return JSONResponse(error_body(413, f"the request body is over {MAX_BODY_BYTES} bytes"), status_code=413)
        return await call_next(request)

    async def read_body(request: Request) -> dict:
        raw = b""
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > MAX_BODY_BYTES:
                raise ApiError(413, f"the request body is over {MAX_BODY_BYTES} bytes")
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError, and numbers past Python's digit limit
            raise ApiError(400, f"the body is not valid JSON: {exc}") from None
        except RecursionError:
            raise ApiError(400, "the body is not valid JSON: nested too deeply") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object")
        return body

    @app.get("/health")
    async def health():
        return {"status": "ok", "models": list(api.served), "running": engine.running,
                "waiting": engine.waiting.qsize()}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": api.created,
                                            "owned_by": "loraforge"} for name in api.served]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await read_body(request)
        served = api.model(body)
        messages = _messages(body)
        if served.system_prompt is not None and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": served.system_prompt}, *messages]
        try:
            ids = prompt_ids(served.tokenizer, messages)
        except LoraforgeError as exc:
            raise ApiError(400, str(exc), "messages") from None
        return await respond(request, body, served, ids, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await read_body(request)
        served = api.model(body)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise ApiError(400, "prompt must be a non-empty string", "prompt")
        try:
            ids = prompt_ids(served.tokenizer, prompt)
        except LoraforgeError as exc:
            raise ApiError(400, str(exc), "prompt") from None
        return await respond(request, body, served, ids, chat=False)

    async def respond(request: Request, body: dict, served: Served, ids: list[int], chat: bool):
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        job = api.job(body, served, ids, lambda event: loop.call_soon_threadsafe(events.put_nowait, event),
                      "messages" if chat else "prompt")
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise ApiError(400, "stream must be true or false", "stream")
        shape = Shape(served.name, chat, len(ids))
        engine.submit(job)
        deadline = loop.time() + api.timeout_s
        if stream:
            return StreamingResponse(_stream(job, events, shape, deadline), media_type="text/event-stream")
        try:
            while True:
                try:
                    event = await asyncio.wait_for(events.get(), timeout=min(0.5, max(deadline - loop.time(), 0)))
                except asyncio.TimeoutError:
                    if loop.time() >= deadline:
                        raise ApiError(408, f"no answer within {api.timeout_s:g} s", kind="timeout") from None
                    if await request.is_disconnected():
                        return JSONResponse(error_body(499, "the client left"), status_code=499)
                    continue
                if event[0] == "error":
                    raise ApiError(500, event[1], kind="server_error")
                if event[0] == "done":
                    return shape.whole(job)
        finally:
            job.cancelled.set()

    async def _stream(job: Job, events: asyncio.Queue, shape: "Shape", deadline: float):
        loop = asyncio.get_running_loop()
        stripped = Stripped() if shape.chat else None
        try:
            yield _sse(shape.chunk(None, None, role=True))
            while True:
                try:
                    event = await asyncio.wait_for(events.get(), timeout=max(deadline - loop.time(), 0.001))
                except asyncio.TimeoutError:
                    yield _sse(error_body(408, f"no answer within {api.timeout_s:g} s", kind="timeout"))
                    break
                if event[0] == "delta":
                    text = stripped.feed(event[1]) if stripped else event[1]
                    if text:
                        yield _sse(shape.chunk(text, None))
                elif event[0] == "error":
                    yield _sse(error_body(500, event[1], kind="server_error"))
                    break
                else:
                    yield _sse({**shape.chunk(None, job.finish_reason), "usage": shape.usage(job)})
                    break
            yield "data: [DONE]\n\n"
        finally:
            job.cancelled.set()

    return app


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


class Stripped:
    """A streamed chat answer as the whole one is sent, stripped: leading whitespace dropped, trailing whitespace
    held back until more text follows it, so it is never sent if nothing does."""

    def __init__(self):
        self.started = False
        self.held = ""

    def feed(self, text: str) -> str:
        if not self.started:
            text = text.lstrip()
            if not text:
                return ""
            self.started = True
        body = text.rstrip()
        if not body:
            self.held += text
            return ""
        out, self.held = self.held + body, text[len(body):]
        return out


class Shape:
    """OpenAI's response objects for one request."""

    def __init__(self, model: str, chat: bool, prompt_tokens: int):
        self.model, self.chat, self.prompt_tokens = model, chat, prompt_tokens
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{secrets.token_hex(12)}"
        self.created = int(time.time())

    def usage(self, job: Job) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": len(job.tokens),
                "total_tokens": self.prompt_tokens + len(job.tokens)}

    def _head(self, kind: str) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    @staticmethod
    def _reason(reason: str | None) -> str | None:
        return "stop" if reason == "cancelled" else reason

    def whole(self, job: Job) -> dict:
        text = job.text.strip() if self.chat else job.text
        choice = ({"index": 0, "message": {"role": "assistant", "content": text}} if self.chat
                  else {"index": 0, "text": text, "logprobs": None})
        return {**self._head("chat.completion" if self.chat else "text_completion"),
                "choices": [{**choice, "finish_reason": self._reason(job.finish_reason)}], "usage": self.usage(job)}

    def chunk(self, text: str | None, reason: str | None, role: bool = False) -> dict:
        if not self.chat:
            return {**self._head("text_completion"),
                    "choices": [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": self._reason(reason)}]}
        delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text is not None else {})
        return {**self._head("chat.completion.chunk"),
                "choices": [{"index": 0, "delta": delta, "finish_reason": self._reason(reason)}]}
