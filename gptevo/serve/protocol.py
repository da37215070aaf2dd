"""The OpenAI request and response bodies: validation of what clients send, shapes of what they get.

Requests (``/v1/completions`` and ``/v1/chat/completions``) are checked field by field; a wrong type
or value is a 400 whose message and ``param`` name the field. Fields the server does not implement are
refused when set to anything but their default (``n`` other than 1, ``logprobs``, ``echo``,
``best_of`` > 1, ``suffix``, penalties, ``logit_bias``, ``tools``, non-text ``response_format``), so a
client never silently gets something other than what it asked for; unknown fields are ignored, as
OpenAI's clients send a few (``user``, ``metadata``, ``store``).

Responses follow OpenAI's objects: ``text_completion`` / ``chat.completion`` with ``choices`` and
``usage``, and for ``stream: true`` the chunk objects (``chat.completion.chunk``) sent as server-sent
events. The analysis channel of a harmony reply goes in ``reasoning_content`` (the field name of
llama.cpp's and vLLM's servers), the final channel in ``content``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from gptevo.serve.errors import ApiError, bad_request

MAX_STOP = 16                    # stop strings per request
MAX_STOP_CHARS = 256             # characters per stop string
ROLES = ("system", "developer", "user", "assistant", "tool")
REASONING_EFFORTS = ("low", "medium", "high")


@dataclass(frozen=True)
class Options:
    """What both endpoints share. ``max_tokens`` None means the server's default; ``sampling`` holds
    the keyword arguments of :func:`gptevo.generation.sampling_for`, None where the request left a
    field out (the model's ``generation_config.json`` then decides, as in ``gptevo.generate``)."""

    max_tokens: int | None
    sampling: dict
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool


@dataclass(frozen=True)
class CompletionRequest:
    prompt: str | tuple[int, ...]     # text, or token ids
    options: Options


@dataclass(frozen=True)
class ChatRequest:
    messages: tuple[dict, ...]        # {"role": str, "content": str, ["name"], ["channel"]}
    reasoning_effort: str | None
    options: Options


# -- field checks ----------------------------------------------------------------------------------
def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _type_name(v) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null",
            int: "integer", float: "number"}.get(type(v), type(v).__name__)


def _optional_int(body: dict, name: str, low: int) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if not _is_int(v):
        raise bad_request(f"'{name}' must be an integer, got {_type_name(v)}", name)
    if v < low:
        raise bad_request(f"'{name}' must be >= {low}, got {v}", name)
    return v


def _optional_number(body: dict, name: str) -> float | None:
    v = body.get(name)
    if v is None:
        return None
    if not _is_number(v):
        raise bad_request(f"'{name}' must be a finite number, got {_type_name(v)} {str(v)[:40]}", name)
    return float(v)


def _optional_bool(body: dict, name: str) -> bool:
    v = body.get(name)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise bad_request(f"'{name}' must be true or false, got {_type_name(v)}", name)
    return v


def check_model(body: dict, served: str) -> None:
    """``model`` may be omitted; a string other than the served model's name is a 404."""
    v = body.get("model")
    if v is None:
        return
    if not isinstance(v, str):
        raise bad_request(f"'model' must be a string, got {_type_name(v)}", "model")
    if v != served:
        raise ApiError(404, f"the model {v[:100]!r} does not exist on this server; it serves {served!r} "
                       f"(GET /v1/models)", param="model", code="model_not_found")


def _refuse_unsupported(body: dict) -> None:
    n = body.get("n")
    if n is not None and (not _is_int(n) or n != 1):
        raise bad_request(f"only n=1 is supported, got n={str(n)[:40]}", "n")
    best_of = body.get("best_of")
    if best_of is not None and (not _is_int(best_of) or best_of != 1):
        raise bad_request(f"only best_of=1 is supported, got {str(best_of)[:40]}", "best_of")
    for name in ("logprobs", "top_logprobs", "echo", "suffix", "logit_bias", "tools", "functions"):
        v = body.get(name)
        if v not in (None, False, "", {}, []):
            raise bad_request(f"'{name}' is not supported by this server", name)
    for name in ("presence_penalty", "frequency_penalty"):
        v = body.get(name)
        if v is not None and (not _is_number(v) or v != 0):
            raise bad_request(f"'{name}' is not supported by this server (only 0)", name)
    tool_choice = body.get("tool_choice")
    if tool_choice not in (None, "none"):
        raise bad_request("'tool_choice' is not supported by this server", "tool_choice")
    fmt = body.get("response_format")
    if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
        raise bad_request("'response_format' other than {\"type\": \"text\"} is not supported", "response_format")


def _stop(body: dict) -> tuple[str, ...]:
    v = body.get("stop")
    if v is None:
        return ()
    items = [v] if isinstance(v, str) else v
    if not isinstance(items, list) or len(items) > MAX_STOP:
        raise bad_request(f"'stop' must be a string or an array of at most {MAX_STOP} strings", "stop")
    for s in items:
        if not isinstance(s, str) or not s or len(s) > MAX_STOP_CHARS:
            raise bad_request(f"'stop' entries must be non-empty strings of at most {MAX_STOP_CHARS} "
                              f"characters, got {_type_name(s)}", "stop")
    return tuple(items)


def _sampling(body: dict) -> dict:
    temperature = _optional_number(body, "temperature")
    if temperature is not None and temperature < 0:
        raise bad_request(f"'temperature' must be >= 0 (0 = greedy), got {temperature}", "temperature")
    top_p = _optional_number(body, "top_p")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise bad_request(f"'top_p' must be in (0, 1], got {top_p}", "top_p")
    min_p = _optional_number(body, "min_p")                       # extension (vLLM, llama.cpp)
    if min_p is not None and not 0.0 <= min_p <= 1.0:
        raise bad_request(f"'min_p' must be in [0, 1], got {min_p}", "min_p")
    penalty = _optional_number(body, "repetition_penalty")        # extension (vLLM, llama.cpp)
    if penalty is not None and not penalty > 0:
        raise bad_request(f"'repetition_penalty' must be > 0 (1 = off), got {penalty}", "repetition_penalty")
    top_k = body.get("top_k")                                     # extension; -1 or 0 = off
    if top_k is not None and (not _is_int(top_k) or top_k < -1):
        raise bad_request(f"'top_k' must be an integer >= -1 (-1 or 0 = off), got {str(top_k)[:40]}", "top_k")
    seed = body.get("seed")
    if seed is not None and (not _is_int(seed) or not 0 <= seed < 2**63):
        raise bad_request(f"'seed' must be an integer in [0, 2^63), got {str(seed)[:40]}", "seed")
    return {"temperature": temperature, "top_k": None if top_k is None else max(0, top_k), "top_p": top_p,
            "min_p": min_p, "repetition_penalty": penalty, "seed": seed}


def _options(body: dict, max_tokens_fields: tuple[str, ...]) -> Options:
    _refuse_unsupported(body)
    max_tokens = None
    for name in max_tokens_fields:
        v = _optional_int(body, name, 1)
        if v is not None:
            max_tokens = v
    stream = _optional_bool(body, "stream")
    so = body.get("stream_options")
    if so is not None and not isinstance(so, dict):
        raise bad_request(f"'stream_options' must be an object, got {_type_name(so)}", "stream_options")
    include_usage = _optional_bool(so or {}, "include_usage")
    return Options(max_tokens, _sampling(body), _stop(body), stream, include_usage)


def _object(body) -> dict:
    if not isinstance(body, dict):
        raise bad_request(f"the request body must be a JSON object, got {_type_name(body)}")
    return body


# -- requests --------------------------------------------------------------------------------------
def parse_completion(body, served: str) -> CompletionRequest:
    """A checked ``/v1/completions`` request (see the module doc)."""
    body = _object(body)
    check_model(body, served)
    if "prompt" not in body:
        raise bad_request("'prompt' is required", "prompt")
    prompt = body["prompt"]
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]                                  # a batch of one
    if isinstance(prompt, str):
        if not prompt:
            raise bad_request("'prompt' cannot be empty", "prompt")
    elif isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        prompt = tuple(prompt)
    elif isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        raise bad_request(f"one prompt per request is supported, got {len(prompt)}", "prompt")
    else:
        raise bad_request("'prompt' must be a non-empty string or a non-empty array of token ids "
                          f"(integers), got {_type_name(prompt)}", "prompt")
    return CompletionRequest(prompt, _options(body, ("max_tokens",)))


def _message_content(m: dict, i: int) -> str:
    content = m.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise bad_request(f"messages[{i}].content[{j}]: only text parts ({{\"type\": \"text\", "
                                  f"\"text\": ...}}) are supported", "messages")
            parts.append(part["text"])
        return "".join(parts)
    raise bad_request(f"messages[{i}].content must be a string or an array of text parts, "
                      f"got {_type_name(content)}", "messages")


def parse_chat(body, served: str) -> ChatRequest:
    """A checked ``/v1/chat/completions`` request (see the module doc)."""
    body = _object(body)
    check_model(body, served)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request(f"'messages' must be a non-empty array, got {_type_name(messages)}", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise bad_request(f"messages[{i}] must be an object, got {_type_name(m)}", "messages")
        role = m.get("role")
        if role not in ROLES:
            raise bad_request(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {str(role)[:40]!r}",
                              "messages")
        msg = {"role": role, "content": _message_content(m, i)}
        for key in ("name", "channel"):
            if isinstance(m.get(key), str):
                msg[key] = m[key]
        out.append(msg)
    effort = body.get("reasoning_effort")
    if effort is not None and effort not in REASONING_EFFORTS:
        raise bad_request(f"'reasoning_effort' must be one of {', '.join(REASONING_EFFORTS)}, "
                          f"got {str(effort)[:40]!r}", "reasoning_effort")
    return ChatRequest(tuple(out), effort, _options(body, ("max_tokens", "max_completion_tokens")))


# -- responses -------------------------------------------------------------------------------------
def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_object(rid: str, created: int, model: str, text: str, finish: str | None,
                      use: dict | None, chunk: bool = False) -> dict:
    """A ``text_completion`` (the whole answer, or one streamed chunk of it)."""
    obj = {"id": rid, "object": "text_completion", "created": created, "model": model,
           "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}
    if not chunk or use is not None:
        obj["usage"] = use
    return obj


def chat_object(rid: str, created: int, model: str, content: str, reasoning: str, finish: str | None,
                use: dict) -> dict:
    message = {"role": "assistant", "content": content}
    if reasoning:
        message["reasoning_content"] = reasoning
    return {"id": rid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
            "usage": use}


def chat_chunk(rid: str, created: int, model: str, delta: dict | None, finish: str | None = None,
               use: dict | None = None) -> dict:
    """A ``chat.completion.chunk``; ``delta`` None makes the usage-only chunk (no choices)."""
    choices = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
    obj = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": choices}
    if use is not None:
        obj["usage"] = use
    return obj


def usage_chunk_completion(rid: str, created: int, model: str, use: dict) -> dict:
    return {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": [],
            "usage": use}
