"""From a chat to prompt ids, and from generated ids back to text, incrementally.

Chat formats (chosen once per model, as ``gptevo chat`` does):

- ``harmony``: the tokenizer has the harmony tokens (gpt-oss). The prompt is
  :func:`gptevo.chat.encode_harmony` (``reasoning_effort`` sets ``Reasoning:``); generation stops at
  ``<|return|>`` / ``<|call|>`` or an eos id. The reply is split by channel: ``final`` text goes to
  ``content``, every other channel (``analysis``, ``commentary``) to ``reasoning_content``; messages of
  one field are joined with a newline (as :func:`gptevo.chat.parse_harmony` joins them).
- ``template``: the model directory's ``chat_template`` (or a file given with ``--chat-template``),
  rendered with ``add_generation_prompt`` and encoded without adding special tokens.
- ``plain``: a model with neither (the bundled Austen model is not chat-trained): the messages'
  contents, one per line, and the model continues that text.

Text is produced with :class:`WindowedTextStream`, gptevo.generation's TextStream decoding only a
window of recent ids, so streamed pieces never split a UTF-8 character, never end with the start of a
stop string, and concatenate to the non-streamed text. Stop
strings apply to the reply text (in harmony: to the final channel).
"""
from __future__ import annotations

import os

from gptevo.chat import ChatTemplate, encode_harmony, harmony_stop_ids, load_chat_template
from gptevo.errors import FormatError
from gptevo.generation import TextStream
from gptevo.strict_json import read_json_file

HARMONY_FIELDS = {"final": "content"}         # any other channel -> "reasoning_content"


class WindowedTextStream(TextStream):
    """A TextStream whose push costs O(window) instead of O(length).

    TextStream decodes the context and every new id on each push (quadratic in the reply). Here the
    text of ``ids[:settled]`` is kept, and only ``ids[settled:]`` is decoded, after the ``WINDOW`` ids
    before it (so decoders that look at the previous token, like SentencePiece's leading space, see
    it). A piece is settled only when the decode of window + piece starts with the decode of the
    window alone and does not end in U+FFFD (an unfinished UTF-8 character); when a decode does not
    start with its window's text, the whole text is decoded as TextStream does. So the text is the
    same as TextStream's for every tokenizer whose decoding is stable under appending tokens (byte-
    level BPE, tiktoken, SentencePiece).
    """

    WINDOW = 8
    SETTLE_EVERY = 32

    def __init__(self, tokenizer, context_ids=(), stop: tuple[str, ...] = ()):
        super().__init__(tokenizer, context_ids, stop)
        self._settled = 0               # ids[:settled] have their text in _settled_text
        self._settled_text = ""
        self._head: tuple[int, str] = (-1, "")     # (start, decode of its window)

    def _window(self, start: int) -> list[int]:
        """The WINDOW ids before ``ids[start]`` (prompt context included)."""
        before = self.ids[max(0, start - self.WINDOW):start]
        if len(before) < self.WINDOW:
            before = self.context[len(self.context) - (self.WINDOW - len(before)):] + before
        return before

    def _decode_after(self, start: int, end: int) -> str | None:
        """Text of ``ids[start:end]`` decoded after its window, or None when not prefix-stable."""
        window = self._window(start)
        if self._head[0] != start:
            self._head = (start, self.tokenizer.decode(window) if window else "")
        head = self._head[1]
        full = self.tokenizer.decode(window + self.ids[start:end])
        return full[len(head):] if full.startswith(head) else None

    def _text(self) -> str:
        n = len(self.ids)
        if n - self._settled >= self.SETTLE_EVERY:
            end = n - self.WINDOW
            piece = self._decode_after(self._settled, end)
            if piece is not None and not piece.endswith("\ufffd"):
                self._settled_text += piece
                self._settled = end
        tail = self._decode_after(self._settled, n)
        if tail is None:
            return super()._text()
        return self._settled_text + tail


class TextReply:
    """Generated ids -> ``[(field, text)]`` deltas of one text field (``text`` or ``content``)."""

    def __init__(self, tokenizer, prompt_ids, stop: tuple[str, ...], stop_ids, field: str):
        self.stream = WindowedTextStream(tokenizer, prompt_ids, stop)
        self.stop_ids = frozenset(stop_ids)
        self.field = field
        self.ended = False                 # a stop id arrived (it is never decoded)

    @property
    def stopped(self) -> bool:
        """A stop string appeared: the text ends before it and the request should be cancelled."""
        return self.stream.stopped

    def push(self, token: int) -> list[tuple[str, str]]:
        if self.ended or token in self.stop_ids:
            self.ended = True
            return []
        piece = self.stream.push(token)
        return [(self.field, piece)] if piece else []

    def finish(self) -> list[tuple[str, str]]:
        piece = self.stream.finish()
        return [(self.field, piece)] if piece else []


class HarmonyReply:
    """A harmony completion -> ``content`` / ``reasoning_content`` deltas, token by token.

    The completion starts after the prompt's ``<|start|>assistant``, so it opens with a header
    (``<|channel|>analysis<|message|>``). Header tokens are collected until ``<|message|>``; content
    tokens go through a TextStream of the message's field; ``<|end|>`` closes a message and
    ``<|start|>`` opens the next header; a stop id ends the reply.
    """

    def __init__(self, tokenizer, stop: tuple[str, ...], stop_ids):
        self.tokenizer = tokenizer
        self.stop = stop
        self.stop_ids = frozenset(stop_ids)
        names = ("<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|constrain|>")
        self.special = {tokenizer.token_to_id(n): n for n in names}
        self.header: list[int] = []
        self.in_header = True
        self.stream: TextStream | None = None
        self.field = "reasoning_content"
        self.written: set[str] = set()     # fields that already have text (a newline joins messages)
        self.pending_newline = False
        self.ended = False

    @property
    def stopped(self) -> bool:
        return self.stream is not None and self.stream.stopped

    def _header_channel(self) -> str | None:
        parts = []
        run: list[int] = []
        for t in self.header:
            if t in self.special:
                if run:
                    parts.append(self.tokenizer.decode(run))
                    run = []
                parts.append(self.special[t])
            else:
                run.append(t)
        if run:
            parts.append(self.tokenizer.decode(run))
        text = "".join(parts)
        if "<|channel|>" not in text:
            return None
        words = text.split("<|channel|>", 1)[1].split("<|constrain|>")[0].split()
        words = [w for w in words if not w.startswith("to=")]
        return words[0] if words else None

    def _emit(self, piece: str) -> list[tuple[str, str]]:
        if not piece:
            return []
        out = []
        if self.pending_newline:
            out.append((self.field, "\n"))
            self.pending_newline = False
        self.written.add(self.field)
        out.append((self.field, piece))
        return out

    def _close_message(self) -> list[tuple[str, str]]:
        out = self._emit(self.stream.finish()) if self.stream is not None and not self.stream.stopped else []
        self.stream = None
        return out

    def push(self, token: int) -> list[tuple[str, str]]:
        if self.ended or self.stopped:
            return []
        if token in self.stop_ids:
            self.ended = True
            return self._close_message()
        name = self.special.get(token)
        if name == "<|start|>" or name == "<|end|>":
            out = self._close_message()
            self.in_header, self.header = True, []
            return out
        if self.in_header:
            if name == "<|message|>":
                channel = self._header_channel()
                self.field = HARMONY_FIELDS.get(channel, "reasoning_content")
                stop = self.stop if self.field == "content" else ()
                self.stream = WindowedTextStream(self.tokenizer, (), stop)
                self.pending_newline = self.field in self.written
                self.in_header = False
            else:
                self.header.append(token)
            return []
        return self._emit(self.stream.push(token))

    def finish(self) -> list[tuple[str, str]]:
        return self._close_message()


class ChatFormat:
    """How one model's chats become prompt ids and its replies become deltas (see the module doc)."""

    def __init__(self, kind: str, tokenizer, eos_ids, harmony_stops=(), template: ChatTemplate | None = None):
        self.kind = kind
        self.tokenizer = tokenizer
        self.template = template
        self.stop_ids = tuple(dict.fromkeys((*harmony_stops, *eos_ids)))

    def prompt_ids(self, messages, reasoning_effort: str | None = None) -> list[int]:
        if self.kind == "harmony":
            return encode_harmony(self.tokenizer, list(messages), reasoning=reasoning_effort or "medium")
        if self.kind == "template":
            text = self.template.render(list(messages), add_generation_prompt=True)
            return self.tokenizer.encode(text, add_special_tokens=False)
        text = "\n".join(m["content"] for m in messages) + "\n"
        return self.tokenizer.encode(text)

    def reply(self, prompt_ids, stop: tuple[str, ...]):
        if self.kind == "harmony":
            return HarmonyReply(self.tokenizer, stop, self.stop_ids)
        return TextReply(self.tokenizer, prompt_ids, stop, self.stop_ids, "content")


def read_template_file(path: str, model_dir: str | None) -> ChatTemplate:
    """A ``--chat-template`` file, with the special tokens of the model's tokenizer_config.json."""
    try:
        with open(path, "rb") as f:
            text = f.read(1024 * 1024 + 1).decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise FormatError(f"{path}: cannot read the chat template (--chat-template): {exc}") from None
    special = {}
    config_path = os.path.join(model_dir, "tokenizer_config.json") if model_dir else ""
    if config_path and os.path.isfile(config_path):
        config = read_json_file(config_path, config_path, FormatError, 16 * 1024 * 1024)
        for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
            v = config.get(key) if isinstance(config, dict) else None
            v = v.get("content") if isinstance(v, dict) else v
            if isinstance(v, str):
                special[key] = v
    return ChatTemplate(path, text, special)


def chat_format(model, tokenizer, template_path: str | None = None) -> ChatFormat:
    """The model's chat format: ``--chat-template`` file, else harmony, else its template, else plain."""
    eos = tuple(model.config.eos_token_ids)
    path = getattr(model, "path", None)
    if template_path:
        return ChatFormat("template", tokenizer, eos, template=read_template_file(template_path, path))
    stops = harmony_stop_ids(tokenizer)
    if stops is not None:
        return ChatFormat("harmony", tokenizer, eos, harmony_stops=stops)
    template = load_chat_template(path) if path else None
    if template is not None:
        return ChatFormat("template", tokenizer, eos, template=template)
    return ChatFormat("plain", tokenizer, eos)
