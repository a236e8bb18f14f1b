"""The request schema and the error object: what a client may send, and how a refusal is answered.

Types are strict (no coercion: `true` or `"16"` is not a number, `1` is not a boolean), every number is finite
and bounded, and an unknown field is refused, so that anything out of range is a 400 naming the field before
it reaches the engine. Limits that depend on the served model (its context) or on the server's settings (total
characters, messages, prompt tokens) are checked in app.py, before any tokenisation.
"""

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

from budgetthink.budget import budget_field

EFFORT_BUDGETS = {"minimal": 64, "low": 256, "medium": 1024, "high": None}  # reasoning_effort -> thinking cap
INT32 = 2**31 - 1  # bound of the token counts: far beyond any context, and it fits the engine's tensors


class StreamOptions(BaseModel):
    """OpenAI's stream options."""

    model_config = ConfigDict(extra="forbid")
    include_usage: StrictBool = Field(False, description="send a last chunk with the usage before [DONE]")


class ResponseFormat(BaseModel):
    """OpenAI's response_format: plain text only (no constrained decoding here)."""

    model_config = ConfigDict(extra="allow")
    type: Literal["text", "json_object", "json_schema"] = Field(description="text; the JSON modes are refused")


class CommonRequest(BaseModel):
    """Fields shared by chat and text completions (OpenAI's, then the thinking-budget extras)."""

    model_config = ConfigDict(extra="forbid")
    model: StrictStr = Field(max_length=4096, description="the served model's id (GET /v1/models)")
    max_tokens: StrictInt | None = Field(None, ge=1, le=INT32, description="cap on sampled tokens per choice (thinking + answer)")
    max_completion_tokens: StrictInt | None = Field(None, ge=1, le=INT32,
                                                    description="OpenAI's newer name for max_tokens; wins if both")
    temperature: StrictFloat = Field(1.0, ge=0, le=2, allow_inf_nan=False,
                                     description="0 is greedy (and so is anything below the engine's GREEDY_BELOW)")
    top_p: StrictFloat = Field(1.0, gt=0, le=1, allow_inf_nan=False, description="nucleus sampling mass")
    top_k: StrictInt = Field(0, ge=0, le=INT32, description="keep the k most likely tokens; 0 keeps all (vLLM's extra field)")
    n: StrictInt = Field(1, ge=1, le=128, description="choices per prompt")
    stop: StrictStr | list[StrictStr] | None = Field(None, description="up to 4 stop strings")
    seed: StrictInt | None = Field(None, ge=0, le=2**63 - 1, description="sampling seed (per request, whatever it is batched with)")
    stream: StrictBool = Field(False, description="send server-sent events")
    stream_options: StreamOptions | None = Field(None, description="streaming options")
    user: StrictStr | None = Field(None, max_length=256, description="end-user id (accepted, unused)")
    # thinking budget (extra body fields): Budget's fields (default, bounds, description), strict, with the
    # server's tighter limits; Budget's `extensions` is the API's `thinking_extensions`
    max_thinking_tokens: StrictInt | None = budget_field("max_thinking_tokens")
    min_thinking_tokens: StrictInt = budget_field("min_thinking_tokens")
    thinking_extensions: StrictInt = budget_field("extensions", le=64)
    extension_string: StrictStr | None = budget_field("extension_string", max_length=256)
    answer_prefix: StrictStr = budget_field("answer_prefix", max_length=256)
    thinking_token_budget: StrictInt | None = budget_field("max_thinking_tokens",
                                                           description="vLLM's name for max_thinking_tokens")
    response_format: ResponseFormat | None = Field(None, description="only {'type': 'text'} is supported")


class TextPart(BaseModel):
    """One part of a message's content (text only)."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["text"] = Field(description="only text parts are supported")
    text: StrictStr = Field(description="the text")


class ChatMessage(BaseModel):
    """One chat turn."""

    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"] = Field(description="who speaks")
    content: StrictStr | list[TextPart] | None = Field(description="what is said")
    name: StrictStr | None = Field(None, max_length=256, description="speaker name (accepted, unused)")

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])


class ChatRequest(CommonRequest):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1, description="the conversation so far (at most the server's max_messages)")
    logprobs: StrictBool | None = Field(None, description="not supported: only false")
    top_logprobs: StrictInt | None = Field(None, ge=0, le=20, description="not supported: only 0")
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high"] | None = Field(
        None, description="'none' answers without thinking; minimal, low and medium cap thinking at "
                          "EFFORT_BUDGETS tokens, high leaves it to the model (max_thinking_tokens, if sent, wins)")
    chat_template_kwargs: dict[StrictStr, Any] | None = Field(
        None, description="passed to the chat template; enable_thinking: false answers without thinking")

    @property
    def thinks(self) -> bool:
        """Whether the reply opens thinking (off with reasoning_effort 'none' or enable_thinking false)."""
        return self.reasoning_effort != "none" and (self.chat_template_kwargs or {}).get("enable_thinking") is not False


class CompletionRequest(CommonRequest):
    """POST /v1/completions."""

    prompt: StrictStr | list[StrictStr] = Field(description="one prompt or a list of prompts")
    logprobs: StrictInt | None = Field(None, ge=0, le=5, description="not supported: only null or 0")


# --- errors ---------------------------------------------------------------------------------------------
class APIError(Exception):
    """An error answered as OpenAI's error object."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code, self.headers = status, message, type, param, code, headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self):
        from fastapi.responses import JSONResponse

        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "json-or-python"}


def _param(loc) -> str | None:
    """('body', 'messages', 0, 'content', 'list[TextPart]', 0, 'type') -> 'messages[0].content[0].type'.

    Pydantic names the union member it tried inside the location ('list[TextPart]', 'constrained-str'); those
    tags are dropped."""
    out = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif str(part).isidentifier() and str(part) not in TYPE_TAGS:
            out += f".{part}" if out else str(part)
    return out or None


def validation_error(errors) -> APIError:
    """The most specific pydantic/FastAPI validation error as a 400 that names the field."""
    errors = list(errors)
    e = max(errors, key=lambda e: len(e.get("loc", ()))) if errors else {"type": "invalid", "loc": (), "msg": "invalid request"}
    if e.get("type") == "json_invalid":
        detail = (e.get("ctx") or {}).get("error", "")
        return APIError(400, f"request body is not valid JSON ({detail}); send a JSON object", code="invalid_json")
    param = _param(tuple(e.get("loc", ())))
    if e.get("type") == "missing" and param is None:
        return APIError(400, "request body is missing; send a JSON object", code="missing")
    if param is None:
        return APIError(400, f"request body: {e.get('msg')}; send a JSON object with Content-Type: application/json",
                        code=e.get("type"))
    msg = "unknown field; remove it" if e.get("type") == "extra_forbidden" else e.get("msg")
    return APIError(400, f"{param}: {msg}", param=param, code=e.get("type"))
