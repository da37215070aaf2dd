"""Chat formats: harmony (gpt-oss) and Jinja ``chat_template`` (other families), plus reply parsing.

Messages are dicts ``{"role": ..., "content": str}`` as in the OpenAI and HF chat APIs.

**Harmony** (facts: gpt-oss §5; openai/harmony ``docs/format.md``). Each message is
``<|start|>{header}<|message|>{content}<|end|>``. :func:`harmony_segments` renders:

- the system message, always first, built from parameters (the gpt-oss "system" slot holds meta
  information, not instructions)::

      You are ChatGPT, a large language model trained by OpenAI.
      Knowledge cutoff: 2024-06
      [Current date: YYYY-MM-DD]           (only when ``current_date`` is given)

      Reasoning: medium

      # Valid channels: analysis, commentary, final. Channel must be included for every message.

- ``system`` and ``developer`` messages (the "system prompt" of other APIs; as in HF's gpt-oss
  template) joined into one developer message ``# Instructions\\n\\n{instructions}``;
- ``user`` messages as ``user``; ``assistant`` messages as ``assistant<|channel|>{channel}``
  (``final`` unless the message has ``"channel"``); analysis messages before the last final answer
  are dropped (facts §5: drop earlier chain of thought); ``tool`` messages with ``"name"`` as
  ``functions.{name} to=assistant<|channel|>commentary``;
- with ``add_generation_prompt``, the prompt ends with ``<|start|>assistant``.

Special tokens are separate segments, and message text is encoded with special-token parsing off,
so a user who types ``<|end|>`` cannot forge message boundaries. The model answers
``<|channel|>analysis<|message|>...<|end|><|start|>assistant<|channel|>final<|message|>...<|return|>``;
generation stops on ``<|return|>`` or ``<|call|>`` and :func:`parse_harmony` splits the reply.

**chat_template**: ``chat_template.jinja`` or the ``chat_template`` of ``tokenizer_config.json``
(a string, or a list of ``{"name", "template"}`` whose ``default`` entry is used), rendered in
jinja2's ``ImmutableSandboxedEnvironment`` (as transformers does: ``trim_blocks``, ``lstrip_blocks``,
``loopcontrols``, ``raise_exception``, ``strftime_now``, a ``tojson`` that keeps non-ASCII). A
template that reaches for Python internals raises jinja2's ``SecurityError``, reported as a
FormatError naming the file (reliability D5); ``raise_exception(msg)`` in the template is a
RequestError (the conversation broke the template's rules).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from gptevo.errors import FormatError, RequestError
from gptevo.strict_json import read_json_file

MAX_TEMPLATE_BYTES = 1024 * 1024
HARMONY_TOKENS = ("<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|constrain|>", "<|return|>",
                  "<|call|>")
HARMONY_STOPS = ("<|return|>", "<|call|>")      # stop_tokens_for_assistant_actions()
IDENTITY = "You are ChatGPT, a large language model trained by OpenAI."
CHANNELS_LINE = "# Valid channels: analysis, commentary, final. Channel must be included for every message."
REASONING = ("low", "medium", "high")

# -- harmony: rendering ----------------------------------------------------------------------------


def _content(message, i: int) -> str:
    if not isinstance(message, dict):
        raise RequestError(f"messages[{i}] must be a dict with 'role' and 'content', got {type(message).__name__}")
    content = message.get("content", "")
    if not isinstance(content, str):
        raise RequestError(f"messages[{i}]['content'] must be a str, got {type(content).__name__}")
    return content


def harmony_system_content(reasoning: str = "medium", knowledge_cutoff: str = "2024-06",
                           current_date: str | None = None, function_tools: bool = False) -> str:
    """The text of the harmony system message (see the module doc)."""
    if reasoning not in REASONING:
        raise RequestError(f"reasoning must be one of {', '.join(REASONING)}, got {reasoning!r}")
    lines = [IDENTITY, f"Knowledge cutoff: {knowledge_cutoff}"]
    if current_date:
        lines.append(f"Current date: {current_date}")
    text = "\n".join(lines) + f"\n\nReasoning: {reasoning}\n\n{CHANNELS_LINE}"
    if function_tools:
        text += "\nCalls to these tools must go to the commentary channel: 'functions'."
    return text


def harmony_segments(messages, *, reasoning: str = "medium", current_date: str | None = None,
                     knowledge_cutoff: str = "2024-06", add_generation_prompt: bool = True) -> list[tuple[str, bool]]:
    """The conversation as ``(text, is_special_token)`` segments (see the module doc)."""
    if not isinstance(messages, (list, tuple)):
        raise RequestError(f"messages must be a list of dicts, got {type(messages).__name__}")
    out: list[tuple[str, bool]] = []

    def message(header: list[tuple[str, bool]], content: str) -> None:
        out.append(("<|start|>", True))
        out.extend(header)
        out.extend([("<|message|>", True), (content, False), ("<|end|>", True)])

    message([("system", False)], harmony_system_content(reasoning, knowledge_cutoff, current_date))
    instructions = [_content(m, i) for i, m in enumerate(messages)
                    if isinstance(m, dict) and m.get("role") in ("system", "developer")]
    if instructions:
        message([("developer", False)], "# Instructions\n\n" + "\n\n".join(instructions))
    last_final = max((i for i, m in enumerate(messages) if isinstance(m, dict) and m.get("role") == "assistant"
                      and m.get("channel", "final") == "final"), default=-1)
    for i, m in enumerate(messages):
        content = _content(m, i)
        role = m.get("role")
        if role in ("system", "developer"):
            continue
        if role == "user":
            message([("user", False)], content)
        elif role == "assistant":
            channel = m.get("channel", "final")
            if channel == "analysis" and i < last_final:
                continue
            header = [("assistant", False), ("<|channel|>", True), (str(channel), False)]
            message(header, content)
        elif role == "tool":
            name = m.get("name")
            if not isinstance(name, str) or not name:
                raise RequestError(f"messages[{i}] is a tool message without a 'name'")
            name = name if "." in name else f"functions.{name}"
            message([(f"{name} to=assistant", False), ("<|channel|>", True), ("commentary", False)], content)
        else:
            raise RequestError(f"messages[{i}] has role {role!r}; expected system, developer, user, "
                               f"assistant or tool")
    if add_generation_prompt:
        out += [("<|start|>", True), ("assistant", False)]
    return out


def render_harmony(messages, **options) -> str:
    """The harmony prompt as one string (special tokens written out)."""
    return "".join(text for text, _ in harmony_segments(messages, **options))


def encode_harmony(tokenizer, messages, **options) -> list[int]:
    """Token ids of the harmony prompt: special tokens by id, message text with specials off."""
    ids: list[int] = []
    for text, special in harmony_segments(messages, **options):
        if special:
            t = tokenizer.token_to_id(text)
            if t is None:
                raise FormatError(f"{tokenizer.source}: the tokenizer has no harmony token {text}")
            ids.append(t)
        elif text:
            ids += tokenizer.encode(text, add_special_tokens=False, allow_special=False)
    return ids


def harmony_stop_ids(tokenizer) -> list[int] | None:
    """Ids of ``<|return|>`` and ``<|call|>``, or None when the tokenizer lacks the harmony tokens."""
    ids = [tokenizer.token_to_id(t) for t in HARMONY_TOKENS]
    if any(t is None for t in ids):
        return None
    return [tokenizer.token_to_id(t) for t in HARMONY_STOPS]


# -- harmony: parsing ------------------------------------------------------------------------------
@dataclass
class HarmonyMessage:
    role: str = "assistant"
    channel: str | None = None
    recipient: str | None = None
    content_type: str | None = None
    content: str = ""


@dataclass
class HarmonyReply:
    """A parsed completion: its messages, the analysis and final texts, and how it ended."""

    messages: list[HarmonyMessage] = field(default_factory=list)
    stop: str | None = None                  # "<|return|>", "<|call|>", or None (cut off)

    def text(self, channel: str) -> str:
        return "\n".join(m.content for m in self.messages if m.channel == channel)

    @property
    def analysis(self) -> str:
        return self.text("analysis")

    @property
    def final(self) -> str:
        return self.text("final")


def _pieces_from_text(text: str) -> list[tuple[str, bool]]:
    pieces, i = [], 0
    while i < len(text):
        hits = [(text.find(t, i), t) for t in HARMONY_TOKENS]
        hits = [(j, t) for j, t in hits if j >= 0]
        if not hits:
            pieces.append((text[i:], False))
            break
        j, t = min(hits)
        if j > i:
            pieces.append((text[i:j], False))
        pieces.append((t, True))
        i = j + len(t)
    return pieces


def _pieces_from_ids(tokenizer, ids) -> list[tuple[str, bool]]:
    specials = {tokenizer.token_to_id(t): t for t in HARMONY_TOKENS}
    pieces, run = [], []
    for t in ids:
        if t in specials:
            if run:
                pieces.append((tokenizer.decode(run), False))
                run = []
            pieces.append((specials[t], True))
        else:
            run.append(t)
    if run:
        pieces.append((tokenizer.decode(run), False))
    return pieces


def parse_harmony(completion, tokenizer=None) -> HarmonyReply:
    """Split an assistant completion (text, or token ids with ``tokenizer``) into messages.

    The completion starts right after the prompt's ``<|start|>assistant``, so the first header has
    the role already. Headers: ``{role}<|channel|>{channel}[ to={recipient}][ <|constrain|>{type}]``.
    A completion cut off mid-message keeps its partial content.
    """
    if isinstance(completion, str):
        pieces = _pieces_from_text(completion)
    else:
        if tokenizer is None:
            raise RequestError("parse_harmony needs the tokenizer to parse token ids")
        pieces = _pieces_from_ids(tokenizer, completion)
    reply = HarmonyReply()
    msg, in_header, header = HarmonyMessage(), True, []
    for text, special in pieces:
        if not special:
            if in_header:
                header.append(text)
            else:
                msg.content += text
        elif text == "<|start|>":
            msg, in_header, header = HarmonyMessage(role=""), True, []
        elif text in ("<|channel|>", "<|constrain|>") and in_header:
            header.append(text)
        elif text == "<|message|>" and in_header:
            _apply_header(msg, "".join(header))
            in_header = False
            reply.messages.append(msg)
        elif text in ("<|end|>", "<|return|>", "<|call|>"):
            if in_header:            # a header that never reached <|message|>
                _apply_header(msg, "".join(header))
                reply.messages.append(msg)
            in_header, header = True, []
            msg = HarmonyMessage()
            if text != "<|end|>":
                reply.stop = text
                break
    return reply


def _apply_header(msg: HarmonyMessage, header: str) -> None:
    head, _, ctype = header.partition("<|constrain|>")
    msg.content_type = ctype.strip() or None
    role_part, _, channel_part = head.partition("<|channel|>")
    for part, is_channel in ((role_part, False), (channel_part, True)):
        words = part.split()
        for w in words:
            if w.startswith("to="):
                msg.recipient = w[3:]
        rest = [w for w in words if not w.startswith("to=")]
        if is_channel and rest:
            msg.channel = rest[0]
        elif not is_channel and rest:
            msg.role = rest[0]
    if not msg.role:
        msg.role = "assistant"


# -- chat_template (other families) ----------------------------------------------------------------
class ChatTemplate:
    """A Jinja chat template from a model directory, rendered in a sandbox (see the module doc)."""

    def __init__(self, source: str, template: str, special: dict[str, str] | None = None):
        self.source = source
        self.special = dict(special or {})
        self._template = _compile(template, source)

    def render(self, messages, add_generation_prompt: bool = True, **variables) -> str:
        from jinja2.exceptions import SecurityError, TemplateError

        if not isinstance(messages, (list, tuple)):
            raise RequestError(f"messages must be a list of dicts, got {type(messages).__name__}")
        for i, m in enumerate(messages):
            _content(m, i)
        context = {**self.special, **variables, "messages": list(messages),
                   "add_generation_prompt": bool(add_generation_prompt)}
        try:
            return self._template.render(**context)
        except _TemplateRaised as exc:
            raise RequestError(f"{self.source}: the chat template refused the conversation: {exc}") from None
        except SecurityError as exc:
            raise FormatError(f"{self.source}: the chat template tried an unsafe operation and was stopped "
                              f"by the sandbox: {str(exc)[:200]}") from None
        except (TemplateError, TypeError, ValueError, KeyError, IndexError, AttributeError,
                RecursionError, OverflowError, ZeroDivisionError) as exc:
            raise FormatError(f"{self.source}: the chat template failed to render: "
                              f"{type(exc).__name__}: {str(exc)[:200]}") from None


class _TemplateRaised(Exception):
    """raise_exception() called by a template."""


def _raise_exception(message):
    raise _TemplateRaised(str(message))


def _strftime_now(fmt):
    import datetime

    return datetime.datetime.now().strftime(str(fmt))


def _tojson(value, indent=None, ensure_ascii=False, separators=None, sort_keys=False):
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, separators=separators, sort_keys=sort_keys)


def _compile(template: str, source: str):
    try:
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:   # pragma: no cover - a core dependency
        raise FormatError(f"{source}: rendering a chat template needs the 'jinja2' package") from None
    if not isinstance(template, str):
        raise FormatError(f"{source}: chat_template must be a string, got {type(template).__name__}")
    if len(template) > MAX_TEMPLATE_BYTES:
        raise FormatError(f"{source}: chat_template is longer than {MAX_TEMPLATE_BYTES} characters")
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(template)
    except (TemplateError, RecursionError, ValueError) as exc:
        raise FormatError(f"{source}: the chat template does not compile: {str(exc)[:200]}") from None


def _token_text(v) -> str | None:
    if isinstance(v, dict):
        v = v.get("content")
    return v if isinstance(v, str) else None


def load_chat_template(model_dir) -> ChatTemplate | None:
    """The chat template of a model directory, or None when it has none."""
    root = os.fspath(model_dir)
    config_path = os.path.join(root, "tokenizer_config.json")
    config = {}
    if os.path.isfile(config_path):
        config = read_json_file(config_path, config_path, FormatError, 16 * 1024 * 1024)
        if not isinstance(config, dict):
            raise FormatError(f"{config_path}: expected a JSON object at the top level")
    special = {k: t for k in ("bos_token", "eos_token", "unk_token", "pad_token")
               if (t := _token_text(config.get(k))) is not None}
    jinja_path = os.path.join(root, "chat_template.jinja")
    if os.path.isfile(jinja_path):
        try:
            with open(jinja_path, "rb") as f:
                data = f.read(MAX_TEMPLATE_BYTES + 1)
            text = data.decode("utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise FormatError(f"{jinja_path}: cannot read the chat template: {exc}") from None
        return ChatTemplate(jinja_path, text, special)
    template = config.get("chat_template")
    if template is None:
        return None
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        if "default" not in named:
            raise FormatError(f"{config_path}: chat_template is a list without a 'default' entry "
                              f"(names: {sorted(map(str, named))[:5]})")
        template = named["default"]
    return ChatTemplate(config_path, template, special)
