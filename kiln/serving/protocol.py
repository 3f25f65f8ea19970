"""The OpenAI request schemas kiln accepts, and its error body.

Fields kiln does not implement (penalties, `user`, `logit_bias`, ...) are ignored rather than
refused: clients such as lm-eval send some of them by default. `return_token_ids` is vLLM's
extension (the completion's token ids, for exact comparisons).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Prompt = str | list[str] | list[int] | list[list[int]]


class Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None  # None: the one served model
    max_tokens: int | None = Field(None, ge=0)  # None: the server's max_tokens, within the context
    temperature: float = Field(1.0, ge=0, le=2)  # 0: greedy
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=1)  # one choice per prompt
    stream: bool = False
    stop: str | list[str] | None = None
    seed: int | None = None  # None: a fresh seed per request
    return_token_ids: bool = False

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stops if s]


class CompletionRequest(Sampling):
    prompt: Prompt
    echo: bool = False  # the prompt's text (and, with logprobs, its tokens) precede the completion
    logprobs: int | None = Field(None, ge=0, le=20)  # top alternatives per token (OpenAI's legacy format)

    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: text, or token ids."""
        if isinstance(self.prompt, str) or (self.prompt and isinstance(self.prompt[0], int)):
            return [self.prompt]
        return list(self.prompt)


class Message(BaseModel):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=0)  # the newer name of max_tokens


class RequestError(Exception):
    """A request kiln refuses: its HTTP status and OpenAI's error fields."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return error_body(self.message, self.kind, self.param, self.code)


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
