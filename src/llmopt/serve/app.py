"""The OpenAI-compatible HTTP API (FastAPI): /v1/models, /v1/completions, /v1/chat/completions (SSE streaming).

Extensions: ``top_k`` in requests; ``POST /v1/models/{name}/load`` and ``DELETE /v1/models/{name}`` to preload or
evict a model; ``GET /health``. Errors come back in OpenAI's shape ``{"error": {"message", "type"}}``.
Requests to one model run one at a time (the engine keeps per-request state); different models run concurrently.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from llmopt.errors import LlmoptError
from llmopt.serve.pool import ModelPool


class _Sampling(BaseModel):
    model: str
    max_tokens: int = Field(16, ge=0)
    temperature: float = Field(1.0, ge=0.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False


class CompletionRequest(_Sampling):
    prompt: str


class ChatMessage(BaseModel):
    role: str
    content: str | list[dict[str, Any]]


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)


class _StopReached(Exception):
    """Raised inside the stream callback when a stop string appears: ends generation early."""


def _text_of(message: ChatMessage) -> str:
    if isinstance(message.content, str):
        return message.content
    parts = []
    for part in message.content:
        if part.get("type") != "text":
            raise LlmoptError(f"message part of type '{part.get('type')}' is not supported by the server "
                              "(text only; `llmopt generate --image` runs image prompts)")
        parts.append(str(part.get("text", "")))
    return "".join(parts)


def _prompt_ids(model, request: CompletionRequest | ChatRequest) -> list[int]:
    tok = model.tokenizer
    if isinstance(request, CompletionRequest):
        return tok.encode(request.prompt)
    if not tok.has_chat_template:
        raise LlmoptError(f"model '{request.model}' has no chat template: use /v1/completions")
    messages = [{"role": m.role, "content": _text_of(m)} for m in request.messages]
    text = tok.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tok.encode(text, add_special_tokens=False)


def _run(pool: ModelPool, request, on_text) -> dict:
    """Generate for ``request``, calling ``on_text(piece)`` per new text piece; returns usage and finish reason."""
    from llmopt.engine.generate import generate

    entry = pool.get(request.model)
    stops = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
    with entry.lock:
        ids = _prompt_ids(entry.model, request)
        state = {"text": "", "sent": 0, "tokens": 0}

        def stream(_seq: int, _token: int, piece: str | None) -> None:
            state["tokens"] += 1
            state["text"] += piece or ""
            cut = min((state["text"].find(s) for s in stops if s in state["text"]), default=-1)
            visible = state["text"] if cut < 0 else state["text"][:cut]
            if len(visible) > state["sent"]:
                on_text(visible[state["sent"]:])
                state["sent"] = len(visible)
            if cut >= 0:
                raise _StopReached

        finish = "length"
        try:
            result = generate(entry.model, [ids], max_new_tokens=request.max_tokens, temperature=request.temperature,
                              top_k=request.top_k, top_p=request.top_p, seed=request.seed, stream=stream)
            finish = result.finish[0]
        except _StopReached:
            finish = "stop"
    return {"finish_reason": finish,
            "usage": {"prompt_tokens": len(ids), "completion_tokens": state["tokens"],
                      "total_tokens": len(ids) + state["tokens"]}}


def _error(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind}}, status_code=status)


def create_app(pool: ModelPool) -> FastAPI:
    app = FastAPI(title="llmopt", description="OpenAI-compatible serving of llmopt models")

    @app.exception_handler(LlmoptError)
    async def _llmopt_error(_request: Request, err: LlmoptError):
        status = 404 if str(err).startswith("unknown model") else 400
        return _error(status, str(err), "not_found_error" if status == 404 else "invalid_request_error")

    @app.get("/health")
    def health():
        return {"status": "ok", "models": pool.names(), "loaded": pool.loaded()}

    @app.get("/v1/models")
    def models():
        loaded = set(pool.loaded())
        return {"object": "list", "data": [{"id": n, "object": "model", "owned_by": "llmopt", "loaded": n in loaded}
                                           for n in pool.names()]}

    @app.post("/v1/models/{name:path}/load")
    async def load(name: str):
        await run_in_threadpool(pool.get, name)
        return {"id": name, "loaded": True}

    @app.delete("/v1/models/{name:path}")
    def unload(name: str):
        return {"id": name, "unloaded": pool.unload(name)}

    async def respond(request: CompletionRequest | ChatRequest, chat: bool):
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        obj = "chat.completion" if chat else "text_completion"

        def choice(text: str, finish: str | None, delta: bool) -> dict:
            if not chat:
                return {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
            body = {"role": "assistant", "content": text}
            return {"index": 0, ("delta" if delta else "message"): body, "finish_reason": finish}

        if not request.stream:
            pieces: list[str] = []
            info = await run_in_threadpool(_run, pool, request, pieces.append)
            return {"id": rid, "object": obj, "created": created, "model": request.model,
                    "choices": [choice("".join(pieces), info["finish_reason"], False)], "usage": info["usage"]}

        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def worker():
            try:
                info = _run(pool, request, lambda piece: loop.call_soon_threadsafe(queue.put_nowait, ("text", piece)))
                loop.call_soon_threadsafe(queue.put_nowait, ("done", info))
            except Exception as err:  # reported to the client as the stream's last event
                loop.call_soon_threadsafe(queue.put_nowait, ("error", err))

        threading.Thread(target=worker, daemon=True).start()

        async def events():
            chunk_obj = "chat.completion.chunk" if chat else "text_completion"
            while True:
                kind, value = await queue.get()
                if kind == "text":
                    payload = {"id": rid, "object": chunk_obj, "created": created, "model": request.model,
                               "choices": [choice(value, None, True)]}
                elif kind == "done":
                    payload = {"id": rid, "object": chunk_obj, "created": created, "model": request.model,
                               "choices": [choice("", value["finish_reason"], True)], "usage": value["usage"]}
                else:
                    payload = {"error": {"message": str(value), "type": type(value).__name__}}
                yield f"data: {json.dumps(payload)}\n\n"
                if kind != "text":
                    yield "data: [DONE]\n\n"
                    return

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: CompletionRequest):
        return await respond(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: ChatRequest):
        return await respond(request, chat=True)

    return app
