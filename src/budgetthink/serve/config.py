"""The server's settings: batching, the limits on one request, and the timeouts that keep one client from
holding the server (`budgetthink serve --help` names the flags)."""

from pydantic import BaseModel, ConfigDict, Field


class ServeConfig(BaseModel):
    """How the server batches, what one request may ask for, and how long anything may take."""

    model_config = ConfigDict(extra="forbid")
    max_batch: int = Field(32, ge=1, description="most rows (prompts x n) decoded together; a request needs at most this many")
    max_queue: int = Field(256, ge=1, description="most requests waiting for the engine; beyond it 429 with Retry-After")
    window: float = Field(0.05, ge=0, description="seconds a whole-call batch waits for a burst to gather "
                                                  "(engines without step-wise decoding only)")
    max_messages: int = Field(256, ge=1, description="most chat messages in one request")
    max_prompt_chars: int | None = Field(None, ge=1, description="most characters of prompt text in one request (all "
                                         "messages or prompts together), checked before tokenising; default 16 x the context")
    max_prompt_tokens: int | None = Field(None, ge=1, description="most prompt tokens in one request (all prompts of a "
                                          "list together); default 4 x the context (each prompt must also fit the context)")
    max_body_bytes: int | None = Field(None, ge=1024, description="largest request body, refused from its Content-Length "
                                       "before it is read; default 8 bytes per allowed character + 64 KiB")
    request_timeout: float = Field(600.0, gt=0, description="seconds a completion request may wait and run; then 504")
    header_timeout: float = Field(10.0, gt=0, description="seconds a connection may take to send a request's headers; "
                                  "then it is closed (slow clients cannot hold sockets)")
    body_timeout: float = Field(30.0, gt=0, description="seconds a client may take to send a request's body; then 408")
    allow_special_tokens: bool = Field(False, description="encode control-token strings in user text as the control "
                                       "tokens (by default they are plain text, so a user cannot close thinking or end "
                                       "generation)")
    tokenizer_threads: int = Field(2, ge=1, description="worker threads that render and tokenise prompts (off the event loop)")

    def resolved(self, context: int) -> "ServeConfig":
        """The settings with the context-dependent defaults filled in."""
        chars = self.max_prompt_chars or 16 * context
        return self.model_copy(update={"max_prompt_chars": chars,
                                       "max_prompt_tokens": self.max_prompt_tokens or 4 * context,
                                       "max_body_bytes": self.max_body_bytes or 8 * chars + 65536})
