"""OpenAI-compatible HTTP API (FastAPI) in front of a :class:`Baichuan2ServingEngine`.

Endpoints: ``POST /v1/chat/completions``, ``POST /v1/completions`` (both with ``stream``), ``GET
/v1/models``, ``GET /health`` and ``GET /`` (the browser chat page). Bodies are parsed and checked
here (not by pydantic), so every bad input is a 4xx with OpenAI's error object
``{"error": {"message", "type", "param", "code"}}`` and one log line.

Token hand-off: the engine thread calls each request's sink, which moves the event onto the
request's ``asyncio.Queue`` with ``loop.call_soon_threadsafe``. A client that goes away closes the
response generator (or is seen by ``request.is_disconnected()``); the request is then cancelled
and its cache row is free before the next decode step.
"""
import asyncio
import contextlib
import dataclasses
import hmac
import json
import logging
import os
import time
import uuid
from typing import Dict, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from baichuan2_chat import build_chat_input
from baichuan2_serving import EngineStoppedError, QueueFullError, SamplingParams, USER_TOKEN_ID

logger = logging.getLogger("baichuan2.serving")

__all__ = ["ApiSettings", "ApiError", "create_app", "default_max_tokens"]

CHAT_PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "chat_page.html")
_PLACEHOLDER_PAGE = ("<!doctype html><html><head><meta charset='utf-8'><title>Baichuan2</title></head><body>"
                     "<p>Baichuan2 server: the chat page (assets/chat_page.html) is not installed. The API is at "
                     "<code>/v1/chat/completions</code>.</p></body></html>")
ROLES = ("system", "user", "assistant")
MAX_STOP_STRINGS = 16
_POLL_SECONDS = 0.5


def default_max_tokens(max_new_tokens, seq_length):
    """Answer length when a request does not say: the generation config's ``max_new_tokens``, capped at
    half the model length so the conversation keeps the other half (HF: 2048 of 4096)."""
    return max(1, min(int(max_new_tokens), int(seq_length) // 2))


@dataclasses.dataclass
class ApiSettings:
    """What the HTTP layer needs besides the engine.

    ``defaults``: ``chat_generation_defaults(...)`` (do_sample, top_k, top_p, temperature,
    repetition_penalty, max_new_tokens); ``eos_token_ids``: ids that end an answer (the user-role
    id 195 is added); ``api_key``: None for no authentication.
    """
    model_name: str
    seq_length: int
    defaults: Dict
    eos_token_ids: tuple = (2,)
    user_token_id: int = USER_TOKEN_ID
    assistant_token_id: Optional[int] = None
    api_key: Optional[str] = None
    max_body_bytes: int = 1 << 20
    chat_page: str = CHAT_PAGE
    on_startup: Optional[object] = None       # callable run once the server is listening (the ready line)


class ApiError(Exception):
    """An error answered with OpenAI's error object."""

    def __init__(self, status, message, type_="invalid_request_error", param=None, code=None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def response(self):
        return JSONResponse({"error": {"message": self.message, "type": self.type, "param": self.param,
                                       "code": self.code}}, status_code=self.status)


# ----- request parsing ---------------------------------------------------------------------------
def _number(body, key, low=None, high=None, integer=False, low_open=False):
    value = body.get(key)
    if value is None:
        return None
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise ApiError(400, f"'{key}' must be {'an integer' if integer else 'a number'}, got {value!r}", param=key)
    if low is not None and (value <= low if low_open else value < low):
        raise ApiError(400, f"'{key}' must be {'>' if low_open else '>='} {low}, got {value}", param=key)
    if high is not None and value > high:
        raise ApiError(400, f"'{key}' must be <= {high}, got {value}", param=key)
    return value


def _stop_strings(body):
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise ApiError(400, "'stop' must be a string or a list of strings", param="stop")
    if len(stops) > MAX_STOP_STRINGS:
        raise ApiError(400, f"'stop' takes at most {MAX_STOP_STRINGS} strings", param="stop")
    return [s for s in stops if s]


def _sampling(body, settings, max_new_tokens):
    """SamplingParams of a request body: its values, else the configured chat defaults."""
    defaults = settings.defaults
    temperature = _number(body, "temperature", 0, 2)
    top_p = _number(body, "top_p", 0, 1, low_open=True)
    top_k = _number(body, "top_k", -1, integer=True)
    penalty = _number(body, "repetition_penalty", 0, low_open=True)
    seed = _number(body, "seed", 0, integer=True)
    do_sample = body.get("do_sample")
    if do_sample is not None and not isinstance(do_sample, bool):
        raise ApiError(400, f"'do_sample' must be true or false, got {do_sample!r}", param="do_sample")
    if do_sample is None:         # OpenAI convention: temperature 0 means greedy
        do_sample = defaults["do_sample"] if temperature is None or temperature > 0 else False
    elif do_sample and temperature == 0:
        raise ApiError(400, "'temperature' must be > 0 when 'do_sample' is true", param="temperature")
    n = _number(body, "n", 1, integer=True)
    if n not in (None, 1):
        raise ApiError(400, f"only n=1 is supported, got n={n}", param="n")
    return SamplingParams(
        max_new_tokens=max_new_tokens, do_sample=do_sample,
        top_k=defaults["top_k"] if top_k is None else max(0, top_k),
        top_p=defaults["top_p"] if top_p is None else float(top_p),
        temperature=defaults["temperature"] if temperature is None or temperature == 0 else float(temperature),
        repetition_penalty=defaults["repetition_penalty"] if penalty is None else float(penalty),
        seed=seed, stop=_stop_strings(body),
        stop_token_ids=tuple(settings.eos_token_ids) + (settings.user_token_id,))


def _requested_max_tokens(body, seq_length):
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    value = _number(body, key, 1, integer=True)
    if value is not None and value >= seq_length:
        raise ApiError(400, f"'{key}' is {value}, but the model holds {seq_length} tokens (prompt + answer): "
                            f"ask for at most {seq_length - 1}", param=key)
    return key, value


def _text_content(content, index):
    """A message's text: a string, or OpenAI's list of ``{"type": "text", "text": ...}`` parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise ApiError(400, f"messages[{index}].content must be a string (or a list of text parts)",
                   param=f"messages[{index}].content")


def _messages(body):
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list", param="messages")
    parsed = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ApiError(400, f"messages[{index}] must be an object", param=f"messages[{index}]")
        role = message.get("role")
        if role not in ROLES:
            raise ApiError(400, f"messages[{index}].role must be one of {', '.join(ROLES)}, got {role!r}",
                           param=f"messages[{index}].role")
        if role == "system" and index != 0:
            raise ApiError(400, "a system message is only allowed as the first message",
                           param=f"messages[{index}].role")
        parsed.append({"role": role, "content": _text_content(message.get("content"), index)})
    return parsed


def _check_model(body, settings):
    model = body.get("model")
    if model is not None and model != settings.model_name:
        raise ApiError(404, f"The model '{model}' does not exist; this server serves '{settings.model_name}'",
                       param="model", code="model_not_found")


# ----- the app -----------------------------------------------------------------------------------
def create_app(engine, tokenizer, settings: ApiSettings) -> FastAPI:
    """The FastAPI app serving ``engine`` (already started) under ``settings``."""
    @contextlib.asynccontextmanager
    async def lifespan(_app):      # uvicorn is listening once this runs
        if settings.on_startup is not None:
            settings.on_startup()
        yield

    app = FastAPI(title="Baichuan2 OpenAI-compatible server", docs_url=None, redoc_url=None, openapi_url=None,
                  lifespan=lifespan)
    created = int(time.time())

    @app.exception_handler(ApiError)
    async def _api_error(request, error):
        logger.warning("%s %s -> %d %s", request.method, request.url.path, error.status, error.message)
        return error.response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, error):
        return await _api_error(request, ApiError(400, str(error.errors()[:1])))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, error):
        return await _api_error(request, ApiError(error.status_code, str(error.detail),
                                                  "not_found_error" if error.status_code == 404 else
                                                  "invalid_request_error"))

    @app.middleware("http")
    async def _authenticate(request: Request, call_next):
        if settings.api_key and request.url.path.startswith("/v1/"):
            header = request.headers.get("authorization", "")
            given = header[7:] if header.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(given.encode(), settings.api_key.encode()):
                return await _api_error(request, ApiError(
                    401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'",
                    "authentication_error", code="invalid_api_key"))
        return await call_next(request)

    async def read_json(request):
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > settings.max_body_bytes:
            raise ApiError(413, f"request body of {length} bytes is over the limit of {settings.max_body_bytes}")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > settings.max_body_bytes:
                raise ApiError(413, f"request body is over the limit of {settings.max_body_bytes} bytes")
        try:
            data = json.loads(bytes(body).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ApiError(400, f"the request body is not valid JSON: {error}") from None
        if not isinstance(data, dict):
            raise ApiError(400, "the request body must be a JSON object")
        return data

    def submit(prompt_ids, params, request_id):
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def sink(event):          # engine thread -> event loop
            try:
                loop.call_soon_threadsafe(queue.put_nowait, event)
            except RuntimeError:  # the loop is closed (server gone)
                pass
        try:
            handle = engine.submit(prompt_ids, params, sink, request_id=request_id)
        except QueueFullError as error:
            raise ApiError(503, f"the server is busy: {error}; retry later", "server_busy", code="queue_full") from None
        except EngineStoppedError as error:
            raise ApiError(503, str(error), "server_unavailable") from None
        except ValueError as error:
            raise ApiError(400, str(error)) from None
        return handle, queue

    async def events(request, handle, queue):
        """The request's engine events until the final one; cancels it if the client goes away."""
        try:
            while True:
                try:
                    event = await asyncio.wait_for(queue.get(), _POLL_SECONDS)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        return
                    continue
                yield event
                if event.finished:
                    return
        finally:
            if not handle.done:
                handle.cancel()
                engine.wake()

    def usage(event):
        return {"prompt_tokens": event.prompt_tokens, "completion_tokens": event.completion_tokens,
                "total_tokens": event.prompt_tokens + event.completion_tokens}

    def respond(request, body, prompt_ids, params, chat):
        request_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        handle, queue = submit(prompt_ids, params, request_id)
        stamp = int(time.time())
        obj = "chat.completion" if chat else "text_completion"
        if not body.get("stream"):
            async def complete():
                text, last = [], None
                async for event in events(request, handle, queue):
                    text.append(event.text)
                    last = event
                if last is None or not last.finished:
                    return JSONResponse({}, status_code=499)
                choice = ({"index": 0, "message": {"role": "assistant", "content": "".join(text)},
                           "logprobs": None, "finish_reason": last.finish_reason} if chat else
                          {"index": 0, "text": "".join(text), "logprobs": None, "finish_reason": last.finish_reason})
                return JSONResponse({"id": request_id, "object": obj, "created": stamp, "model": settings.model_name,
                                     "choices": [choice], "usage": usage(last)})
            return complete()

        options = body.get("stream_options") or {}
        include_usage = bool(isinstance(options, dict) and options.get("include_usage"))
        chunk_obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(text=None, finish_reason=None, role=False, choices=True, usage_value=None):
            if chat:
                delta = {}
                if role:
                    delta["role"] = "assistant"
                if text is not None:
                    delta["content"] = text
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            else:
                choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
            data = {"id": request_id, "object": chunk_obj, "created": stamp, "model": settings.model_name,
                    "choices": [choice] if choices else []}
            if usage_value is not None:
                data["usage"] = usage_value
            return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

        async def stream():
            if chat:
                yield chunk("", role=True)
            async for event in events(request, handle, queue):
                if event.text:
                    yield chunk(event.text)
                if event.finished:
                    yield chunk(None if chat else "", finish_reason=event.finish_reason)
                    if include_usage:
                        yield chunk(choices=False, usage_value=usage(event))
                    yield "data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await read_json(request)
        _check_model(body, settings)
        messages = _messages(body)
        _, max_tokens = _requested_max_tokens(body, settings.seq_length)
        if max_tokens is None:
            max_tokens = default_max_tokens(settings.defaults["max_new_tokens"], settings.seq_length)
        params = _sampling(body, settings, max_tokens)
        prompt_ids = build_chat_input(tokenizer, messages, settings.seq_length - max_tokens,
                                      settings.user_token_id, settings.assistant_token_id)
        result = respond(request, body, prompt_ids, params, chat=True)
        return await result if asyncio.iscoroutine(result) else result

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await read_json(request)
        _check_model(body, settings)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise ApiError(400, "'prompt' must be a non-empty string", param="prompt")
        prompt_ids = list(tokenizer.encode(prompt, add_special_tokens=False))
        seq_length = settings.seq_length
        if len(prompt_ids) >= seq_length:
            raise ApiError(400, f"the prompt has {len(prompt_ids)} tokens; the model holds {seq_length} tokens "
                                "(prompt + answer)", param="prompt", code="context_length_exceeded")
        key, max_tokens = _requested_max_tokens(body, seq_length)
        if max_tokens is None:
            max_tokens = min(default_max_tokens(settings.defaults["max_new_tokens"], seq_length),
                             seq_length - len(prompt_ids))
        elif len(prompt_ids) + max_tokens > seq_length:
            raise ApiError(400, f"the prompt has {len(prompt_ids)} tokens and '{key}' is {max_tokens}: together over "
                                f"the model's {seq_length} tokens", param=key, code="context_length_exceeded")
        params = _sampling(body, settings, max_tokens)
        result = respond(request, body, prompt_ids, params, chat=False)
        return await result if asyncio.iscoroutine(result) else result

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": settings.model_name, "object": "model", "created": created,
                                            "owned_by": "baichuan2"}]}

    @app.get("/health")
    async def health():
        status = "error" if engine.error is not None else "ok"
        return JSONResponse({"status": status, "running": engine.running, "waiting": engine.waiting,
                             "max_batch_size": engine.batch_size}, status_code=200 if status == "ok" else 503)

    @app.get("/", response_class=HTMLResponse)
    async def chat_page():
        if os.path.isfile(settings.chat_page):
            with open(settings.chat_page, encoding="utf-8") as handle:
                return HTMLResponse(handle.read())
        return HTMLResponse(_PLACEHOLDER_PAGE)

    return app
