"""Request bodies of the OpenAI endpoints (pydantic, strict types) and the checks that refuse what
specrun does not implement.  Every field OpenAI defines either changes the output as OpenAI says,
is harmless metadata (``user`` ...), or is refused with a 400 naming it when set to anything but its
neutral value; a field nobody defines is refused too (``extra="forbid"``): nothing is silently
ignored."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

from .errors import APIError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool | None = None
    include_obfuscation: bool | None = None  # sent by newer clients; there is nothing to obfuscate


class Message(_Strict):
    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None


class RequestBase(_Strict):
    """Fields shared by /v1/chat/completions and /v1/completions."""

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # extension (llama.cpp, vLLM)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    return_token_ids: bool | None = None  # extension (as vLLM's): prompt and completion token ids
    # harmless metadata: no effect on the output
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    metadata: dict[str, str] | None = None
    # refused unless neutral (see REFUSED)
    n: Any = None
    presence_penalty: Any = None
    frequency_penalty: Any = None
    logit_bias: Any = None
    logprobs: Any = None
    service_tier: Any = None
    store: Any = None


class ChatRequest(RequestBase):
    messages: list[Message]
    max_completion_tokens: int | None = None
    top_logprobs: Any = None
    tools: Any = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None  # meaningless without tools, which are refused
    functions: Any = None
    function_call: Any = None
    response_format: Any = None
    modalities: Any = None
    audio: Any = None
    prediction: Any = None
    reasoning_effort: Any = None
    verbosity: Any = None
    web_search_options: Any = None


class CompletionRequest(RequestBase):
    prompt: str | list[str] | list[int] | list[list[int]]
    best_of: Any = None
    echo: Any = None
    suffix: Any = None


def _none_or(*neutral):
    return lambda v: v is None or any(v == n and type(v) is type(n) for n in neutral)


# field -> (is the value neutral?, why it is refused)
REFUSED: dict[str, tuple[Any, str]] = {
    "n": (_none_or(1), "one completion per request (n=1)"),
    "best_of": (_none_or(1), "one completion per request (best_of=1)"),
    "logprobs": (_none_or(False, 0), "no log probabilities"),
    "top_logprobs": (_none_or(0), "no log probabilities"),
    "tools": (_none_or([]), "no tool calling"),
    "tool_choice": (_none_or("none"), "no tool calling"),
    "functions": (_none_or([]), "no function calling"),
    "function_call": (_none_or("none"), "no function calling"),
    "response_format": (_none_or({"type": "text"}), "no structured output (text only)"),
    "presence_penalty": (_none_or(0, 0.0), "no presence penalty"),
    "frequency_penalty": (_none_or(0, 0.0), "no frequency penalty"),
    "logit_bias": (_none_or({}), "no logit bias"),
    "echo": (_none_or(False), "the prompt is not echoed"),
    "suffix": (_none_or(""), "no insertion (suffix)"),
    "modalities": (_none_or(["text"]), "text output only"),
    "audio": (_none_or(), "text output only"),
    "prediction": (_none_or(), "no predicted outputs"),
    "reasoning_effort": (_none_or(), "no reasoning controls"),
    "verbosity": (_none_or(), "no verbosity control"),
    "web_search_options": (_none_or(), "no web search"),
    "service_tier": (_none_or("auto", "default"), "one service tier"),
    "store": (_none_or(False), "completions are not stored"),
}

CHAT_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def check_supported(req: RequestBase) -> None:
    """Raise a 400 naming the first field whose value asks for something specrun does not do."""
    for name in type(req).model_fields:
        rule = REFUSED.get(name)
        if rule is None:
            continue
        value = getattr(req, name)
        neutral, why = rule
        if not neutral(value):
            shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
            raise APIError(400, f"'{name}' is not supported by specrun serve: {why}; got {shown}", param=name,
                           code="unsupported_parameter")
    if req.stream_options is not None and not req.stream:
        raise APIError(400, "'stream_options' is only allowed with \"stream\": true", param="stream_options")


def chat_messages(req: ChatRequest) -> list[dict[str, str]]:
    """The messages as the chat template takes them (text content; developer turns as system)."""
    if not req.messages:
        raise APIError(400, "'messages' is empty; give at least one message", param="messages")
    out = []
    for i, m in enumerate(req.messages):
        role = CHAT_ROLES.get(m.role)
        if role is None:
            why = " (no tool calling)" if m.role in ("tool", "function") else ""
            raise APIError(400, f"role '{m.role}' is not supported{why}; use system, developer, user or assistant",
                           param=f"messages[{i}].role")
        content = m.content
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if part.get("type") != "text" or not isinstance(part.get("text"), str) or set(part) - {"type", "text"}:
                    raise APIError(400, f"content part of type {part.get('type')!r} is not supported; only "
                                   "{\"type\": \"text\", \"text\": ...} parts", param=f"messages[{i}].content[{j}]")
                texts.append(part["text"])
            content = "\n".join(texts)
        if content is None:
            raise APIError(400, f"message {i} has no content", param=f"messages[{i}].content")
        msg = {"role": role, "content": content}
        if m.name is not None:
            msg["name"] = m.name
        out.append(msg)
    return out


def max_new_tokens(req: RequestBase, default: int) -> int:
    mct = getattr(req, "max_completion_tokens", None)
    if mct is not None and req.max_tokens is not None and mct != req.max_tokens:
        raise APIError(400, f"'max_tokens' ({req.max_tokens}) and 'max_completion_tokens' ({mct}) disagree; give one",
                       param="max_completion_tokens")
    n = mct if mct is not None else req.max_tokens
    return default if n is None else n


def stop_strings(req: RequestBase) -> tuple[str, ...]:
    if req.stop is None:
        return ()
    return (req.stop,) if isinstance(req.stop, str) else tuple(req.stop)
