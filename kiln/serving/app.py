"""The HTTP routes: OpenAI's /v1/completions, /v1/chat/completions and /v1/models, and /health.

Every refusal is an OpenAI error body with a 4xx status (503 when the queue is full), decided
before a job reaches the model, so a bad request never reaches the other ranks.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from dataclasses import dataclass

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from kiln.serving.engine import Engine, Job
from kiln.serving.protocol import ChatRequest, CompletionRequest, RequestError, Sampling, error_body


@dataclass
class Served:
    name: str  # the `model` requests name
    max_model_len: int
    max_tokens: int  # when a request names none
    chat: object  # a kiln.data.chat.ChatFormatter, or the message saying why there is none


def build_app(engine: Engine, served: Served) -> FastAPI:
    app = FastAPI(title="kiln serve")
    tokenizer = engine.backend.tokenizer

    @app.exception_handler(RequestValidationError)
    async def invalid(_request, exc: RequestValidationError):
        first = exc.errors()[0]
        if first["type"] == "json_invalid":
            return JSONResponse(error_body(f"the request body is not valid JSON ({first['ctx']['error']} at "
                                           f"character {first['loc'][-1]})", "invalid_request_error"), status_code=400)
        param = ".".join(str(p) for p in first["loc"][1:]) or None  # loc starts with "body"
        return JSONResponse(error_body(f"{param + ': ' if param else ''}{first['msg']}", "invalid_request_error",
                                       param), status_code=400)

    @app.exception_handler(RequestError)
    async def refused(_request, exc: RequestError):
        return JSONResponse(exc.body(), status_code=exc.status,
                            headers={"Retry-After": "1"} if exc.status == 503 else None)

    @app.exception_handler(HTTPException)
    async def http_error(_request, exc: HTTPException):
        return JSONResponse(error_body(str(exc.detail), "invalid_request_error"), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def failed(_request, exc: Exception):
        return JSONResponse(error_body(f"the server failed on this request: {exc!r}", "server_error"), status_code=500)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": served.name, "object": "model", "created": 0, "owned_by": "kiln",
                                           "max_model_len": served.max_model_len}]}

    def job(req: Sampling, prompt: list[int], max_tokens: int | None, **scoring) -> Job:
        if req.model is not None and req.model != served.name:
            raise RequestError(404, f"the model {req.model!r} is not served here; this server serves "
                                    f"{served.name!r} (GET /v1/models)", "model", "model_not_found")
        if not prompt:
            raise RequestError(400, "the prompt is empty", "prompt")
        vocab = engine.backend.vocab_size
        if not all(0 <= t < vocab for t in prompt):
            raise RequestError(400, f"prompt token ids must lie in [0, {vocab})", "prompt")
        room = served.max_model_len - len(prompt)
        wanted = min(served.max_tokens, max(room, 0)) if max_tokens is None else max_tokens
        if wanted > room:
            raise RequestError(400, f"this model's maximum context length is {served.max_model_len} tokens; the "
                                    f"prompt has {len(prompt)} and max_tokens asks for {wanted} more: shorten the "
                                    f"prompt or lower max_tokens", "max_tokens", "context_length_exceeded")
        return Job(prompt, wanted, req.temperature, req.top_p,
                   req.seed if req.seed is not None else secrets.randbits(62), req.stops(), **scoring)

    def head(kind: str) -> dict:
        """What every response (and every chunk of one stream) starts with."""
        return {"id": f"{'chatcmpl' if kind.startswith('chat') else 'cmpl'}-{uuid.uuid4().hex}", "object": kind,
                "created": int(time.time()), "model": served.name}

    def usage(jobs: list[Job], results) -> dict:
        prompt, completion = sum(len(j.prompt) for j in jobs), sum(len(r.token_ids) for r in results)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        prompts = req.prompts()
        if not prompts:
            raise RequestError(400, "prompt is an empty list", "prompt")
        if req.stream and len(prompts) > 1:
            raise RequestError(400, "stream takes one prompt per request", "stream")
        ids = [tokenizer(p)["input_ids"] if isinstance(p, str) else list(p) for p in prompts]
        jobs = [job(req, i, req.max_tokens, logprobs=req.logprobs, echo=req.echo) for i in ids]
        echoed = [(p if isinstance(p, str) else tokenizer.decode(i)) if req.echo else "" for p, i in zip(prompts, ids,
                                                                                                        strict=True)]
        if req.stream:
            top = head("text_completion")
            return sse(engine, jobs, lambda text, finish: {
                **top, "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]},
                first=echoed[0])
        results = await engine.submit(jobs)
        choices = []
        for i, (text, r) in enumerate(zip(echoed, results, strict=True)):
            choice = {"index": i, "text": text + r.text, "logprobs": r.logprobs, "finish_reason": r.finish_reason}
            if req.return_token_ids:
                choice["token_ids"] = r.token_ids
            choices.append(choice)
        return {**head("text_completion"), "choices": choices, "usage": usage(jobs, results)}

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest):
        if isinstance(served.chat, str):
            raise RequestError(400, served.chat, "messages")
        prompt = served.chat.prompt_tokens([m.model_dump() for m in req.messages])
        jobs = [job(req, prompt, req.max_completion_tokens if req.max_completion_tokens is not None
                    else req.max_tokens)]
        if req.stream:
            top = head("chat.completion.chunk")
            return sse(engine, jobs, lambda text, finish: {
                **top, "choices": [{
                    "index": 0, "delta": {"content": text} if text else {}, "finish_reason": finish}]},
                first_delta={"role": "assistant", "content": ""})
        result = (await engine.submit(jobs))[0]
        choice = {"index": 0, "message": {"role": "assistant", "content": result.text},
                  "finish_reason": result.finish_reason}
        if req.return_token_ids:
            choice["token_ids"] = result.token_ids
        return {**head("chat.completion"), "choices": [choice], "usage": usage(jobs, [result])}

    return app


def sse(engine: Engine, jobs: list[Job], chunk, first: str = "", first_delta: dict | None = None) -> StreamingResponse:
    """Server-sent events: a chunk per piece of final text, one with the finish reason, then
    `data: [DONE]`. Admission (or 503) happens before the response starts."""
    loop = asyncio.get_running_loop()
    pieces: asyncio.Queue = asyncio.Queue()
    future = engine.submit(jobs, emit=lambda text: loop.call_soon_threadsafe(pieces.put_nowait, text))
    future.add_done_callback(lambda _: pieces.put_nowait(None))  # after every emitted piece

    def event(body: dict) -> str:
        return f"data: {json.dumps(body)}\n\n"

    async def events():
        if first_delta:  # chat: the role comes first, as OpenAI sends it
            body = chunk("", None)
            body["choices"][0]["delta"] = first_delta
            yield event(body)
        if first:  # completions with echo: the prompt's text
            yield event(chunk(first, None))
        while (text := await pieces.get()) is not None:
            yield event(chunk(text, None))
        try:
            result = future.result()[0]
        except Exception as exc:  # the response has started: report in-band, as OpenAI does
            yield event(error_body(f"generation failed: {exc}", "server_error"))
        else:
            yield event(chunk("", result.finish_reason))
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")
