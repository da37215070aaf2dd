"""Tokenizers: ``tokenizer.json`` (Hugging Face ``tokenizers``) and o200k_harmony (``tiktoken``), offline.

:func:`load_tokenizer` picks, for a model directory:

1. ``tokenizer.json`` in the directory, loaded with the ``tokenizers`` package after our own checks
   (reliability list D1-D4): every id of ``model.vocab`` and ``added_tokens`` is a non-negative
   integer below the model's ``vocab_size`` (D1), no id names two different tokens (D2), any error
   of the ``tokenizers`` library is wrapped into a :class:`FormatError` naming the file (D3), and a
   regex that repeats a group ending in an unbounded quantifier (``(a+)+``) is refused (D4).
2. Otherwise, for a gpt-oss model (the original layout ships no ``tokenizer.json``), the
   ``o200k_harmony`` encoding built with ``tiktoken`` from a local ``o200k_base.tiktoken`` file, never
   from the network. The file is looked for in: the ``encodings_base`` argument (a directory holding
   ``o200k_base.tiktoken``, or the file itself), the model directory, and tiktoken's cache directory
   (``cache_dir`` argument, default ``<tempdir>/data-gym-cache``, file named by the SHA-1 of the
   download URL). Its SHA-256 must be tiktoken's published one. This module reads no environment
   variable: the command line passes ``TIKTOKEN_ENCODINGS_BASE`` / ``TIKTOKEN_CACHE_DIR`` on.

o200k_harmony = the o200k_base ranks and regex plus the harmony special tokens (facts: gpt-oss §5):
``<|startoftext|>`` 199998, ``<|endoftext|>`` 199999, ``<|return|>`` 200002, ``<|constrain|>`` 200003,
``<|channel|>`` 200005, ``<|start|>`` 200006, ``<|end|>`` 200007, ``<|message|>`` 200008, ``<|call|>``
200012, every other id of 200000-201087 reserved (``<|reserved_N|>``).

The :class:`Tokenizer` interface: ``encode(text) -> list[int]``, ``decode(ids) -> str``,
``decode_bytes(ids) -> bytes`` (the exact bytes for byte-level BPE and tiktoken, so a stream can hold
back an incomplete UTF-8 sequence), ``token_to_id(token)``, ``special_tokens``, ``eos_token_ids``,
``bos_token_id``, ``vocab_size`` (highest id + 1).
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
import tempfile
from typing import Iterable

from gptevo.errors import FormatError, RequestError
from gptevo.strict_json import read_json_file

MAX_TOKENIZER_BYTES = 256 * 1024 * 1024      # tokenizer.json of gpt-oss is 27 MB
MAX_TIKTOKEN_BYTES = 64 * 1024 * 1024        # o200k_base.tiktoken is 3.6 MB
MAX_CONFIG_BYTES = 16 * 1024 * 1024          # tokenizer_config.json (chat templates included)

# -- o200k_harmony -----------------------------------------------------------------------------
O200K_URL = "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken"
O200K_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"
O200K_FILE = "o200k_base.tiktoken"
# The o200k_base pre-tokenizer regex (tiktoken_ext/openai_public.py, o200k_base), one alternative a line.
O200K_PATTERN = "|".join([
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"\p{N}{1,3}",
    r" ?[^\s\p{L}\p{N}]+[\r\n/]*",
    r"\s*[\r\n]+",
    r"\s+(?!\S)",
    r"\s+",
])
HARMONY_NAMED = {"<|startoftext|>": 199998, "<|endoftext|>": 199999, "<|return|>": 200002,
                 "<|constrain|>": 200003, "<|channel|>": 200005, "<|start|>": 200006, "<|end|>": 200007,
                 "<|message|>": 200008, "<|call|>": 200012}
HARMONY_VOCAB = 201088
HARMONY_EOS = (199999, 200002, 200012)        # <|endoftext|>, <|return|>, <|call|>


def harmony_special_tokens() -> dict[str, int]:
    """Every special token of o200k_harmony: the named ones plus ``<|reserved_N|>`` for the rest."""
    named_ids = set(HARMONY_NAMED.values())
    out = dict(HARMONY_NAMED)
    out.update({f"<|reserved_{i}|>": i for i in range(200000, HARMONY_VOCAB) if i not in named_ids})
    return out


# -- byte-level BPE alphabet (GPT-2) -----------------------------------------------------------
def byte_level_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character map: printable Latin-1 bytes map to themselves, the other
    68 bytes to U+0100, U+0101, ... in byte order (GPT-2 ``encoder.py`` ``bytes_to_unicode``)."""
    keep = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAC + 1)) | set(range(0xAE, 0xFF + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_BYTE_OF_CHAR = {c: b for b, c in byte_level_alphabet().items()}


# -- the interface -----------------------------------------------------------------------------
class Tokenizer:
    """Text <-> token ids. Subclasses: :class:`HFTokenizer`, :class:`HarmonyTokenizer`."""

    source: str = "<memory>"
    vocab_size: int = 0
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    special_tokens: dict[str, int] = {}

    def encode(self, text: str, *, add_special_tokens: bool = True, allow_special: bool = True) -> list[int]:
        """Token ids of ``text``. ``add_special_tokens``: let the tokenizer's post-processor add BOS
        etc. (as HF ``tokenizer(text)`` does). ``allow_special=False`` encodes special-token strings
        such as ``<|end|>`` as plain text (use it for untrusted message content)."""
        raise NotImplementedError

    def decode(self, ids, *, skip_special_tokens: bool = False) -> str:
        raise NotImplementedError

    def decode_bytes(self, ids) -> bytes:
        raise NotImplementedError

    def token_to_id(self, token: str) -> int | None:
        return self.special_tokens.get(token)

    def _check_ids(self, ids) -> list[int]:
        out = []
        for i, t in enumerate(ids):
            if isinstance(t, bool) or not hasattr(t, "__index__"):
                raise RequestError(f"token ids must be integers; item {i} is {t!r}")
            t = int(t)
            if not 0 <= t < self.vocab_size:
                raise RequestError(f"token id {t} at index {i} is out of range [0, {self.vocab_size}) "
                                   f"of the tokenizer {self.source}")
            out.append(t)
        return out

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.source} vocab={self.vocab_size}>"


def _check_text(text) -> str:
    if not isinstance(text, str):
        raise RequestError(f"text to encode must be a str, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise RequestError(f"text is not valid Unicode: {exc.reason} at index {exc.start}") from None
    return text


# -- tokenizer.json ----------------------------------------------------------------------------
class HFTokenizer(Tokenizer):
    """A ``tokenizer.json`` run by the ``tokenizers`` package (checked first, see module doc)."""

    def __init__(self, path: str, vocab_size: int | None = None, config_path: str | None = None):
        self.source = path
        data = read_json_file(path, path, FormatError, MAX_TOKENIZER_BYTES)
        ids, added = _validate_tokenizer_json(data, path, vocab_size)
        try:
            import tokenizers
        except ImportError:   # pragma: no cover - a core dependency
            raise FormatError(f"{path}: reading tokenizer.json needs the 'tokenizers' package") from None
        try:
            self._tok = tokenizers.Tokenizer.from_file(path)
        except Exception as exc:   # tokenizers raises plain Exception for broken structure (D3)
            raise FormatError(f"{path}: the tokenizers library rejected this file: {str(exc)[:300]}") from None
        self.vocab_size = max(ids, default=-1) + 1
        self._added = added                                   # id -> content of added tokens
        self.special_tokens = {content: i for i, (content, special) in added.items() if special}
        self.byte_level = _uses_byte_level(data.get("decoder"))
        self._config = _read_tokenizer_config(config_path)
        self.bos_token_id = self._config_token("bos_token")
        eos = self._config_token("eos_token")
        self.eos_token_ids = () if eos is None else (eos,)

    def _config_token(self, key: str) -> int | None:
        v = self._config.get(key)
        if isinstance(v, dict):
            v = v.get("content")
        return self.token_to_id(v) if isinstance(v, str) else None

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def encode(self, text: str, *, add_special_tokens: bool = True, allow_special: bool = True) -> list[int]:
        text = _check_text(text)
        previous = self._tok.encode_special_tokens
        try:
            self._tok.encode_special_tokens = not allow_special   # True = specials are plain text
            return list(self._tok.encode(text, add_special_tokens=add_special_tokens).ids)
        except Exception as exc:
            raise RequestError(f"{self.source}: could not encode the text: {str(exc)[:200]}") from None
        finally:
            self._tok.encode_special_tokens = previous

    def decode(self, ids, *, skip_special_tokens: bool = False) -> str:
        return self._tok.decode(self._check_ids(ids), skip_special_tokens=skip_special_tokens)

    def decode_bytes(self, ids) -> bytes:
        """Exact bytes for byte-level BPE (each token maps to its bytes; added tokens to their UTF-8);
        for other decoders (SentencePiece style) the UTF-8 of :meth:`decode`."""
        ids = self._check_ids(ids)
        if not self.byte_level:
            return self.decode(ids).encode("utf-8", "surrogatepass")
        out = bytearray()
        for t in ids:
            if t in self._added:
                out += self._added[t][0].encode("utf-8")
                continue
            token = self._tok.id_to_token(t) or ""
            try:
                out += bytes(_BYTE_OF_CHAR[c] for c in token)
            except KeyError:              # not a byte-level token after all
                out += self._tok.decode([t]).encode("utf-8")
        return bytes(out)


def _uses_byte_level(decoder) -> bool:
    if not isinstance(decoder, dict):
        return False
    if decoder.get("type") == "ByteLevel":
        return True
    if decoder.get("type") == "Sequence":
        return any(_uses_byte_level(d) for d in decoder.get("decoders") or [] if isinstance(d, dict))
    return False


def _is_index(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _validate_tokenizer_json(data, path: str, vocab_size: int | None):
    """The ids of ``model.vocab`` and ``added_tokens`` (D1, D2; shape errors are D3)."""
    if not isinstance(data, dict):
        raise FormatError(f"{path}: expected a JSON object at the top level, got {type(data).__name__}")
    model = data.get("model")
    if not isinstance(model, dict):
        raise FormatError(f"{path}: missing or invalid 'model' object")
    limit = f"the model's vocab_size={vocab_size}" if vocab_size is not None else None

    def check_id(t, what: str) -> int:
        if not _is_index(t) or t < 0:
            raise FormatError(f"{path}: {what} has id {t!r}; ids must be non-negative integers")
        if vocab_size is not None and t >= vocab_size:
            raise FormatError(f"{path}: {what} has id {t}, beyond {limit} (embedding rows 0..{vocab_size - 1})")
        return t

    vocab = model.get("vocab")
    ids: list[int] = []
    owner: dict[int, str] = {}
    if isinstance(vocab, dict):                         # BPE, WordPiece, WordLevel: token -> id
        for token, t in vocab.items():
            t = check_id(t, f"model.vocab token {token[:40]!r}")
            if t in owner:
                raise FormatError(f"{path}: model.vocab gives id {t} to two tokens, {owner[t][:40]!r} and "
                                  f"{token[:40]!r}; decoding would be ambiguous")
            owner[t] = token
            ids.append(t)
    elif isinstance(vocab, list):                       # Unigram: [piece, score], id = position
        for i, entry in enumerate(vocab):
            if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str)):
                raise FormatError(f"{path}: model.vocab[{i}] must be [piece, score], got {str(entry)[:60]}")
            check_id(i, f"model.vocab piece {entry[0][:40]!r}")
            owner[i] = entry[0]
            ids.append(i)
    elif vocab is not None:
        raise FormatError(f"{path}: model.vocab must be an object or a list, got {type(vocab).__name__}")

    for part in ("normalizer", "pre_tokenizer", "post_processor", "decoder"):
        _check_patterns(data.get(part), f"{path}: {part}")

    added: dict[int, tuple[str, bool]] = {}
    entries = data.get("added_tokens") or []
    if not isinstance(entries, list):
        raise FormatError(f"{path}: 'added_tokens' must be a list, got {type(entries).__name__}")
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("content"), str):
            raise FormatError(f"{path}: added_tokens[{i}] must be an object with a string 'content'")
        content = entry["content"]
        t = check_id(entry.get("id"), f"added_tokens[{i}] {content[:40]!r}")
        if t in added and added[t][0] != content:
            raise FormatError(f"{path}: added_tokens give id {t} to two tokens, {added[t][0][:40]!r} and "
                              f"{content[:40]!r}; decoding would be ambiguous")
        added[t] = (content, bool(entry.get("special", False)))
        ids.append(t)
    return ids, added


# A group that ends in an unbounded quantifier and is itself repeated, e.g. "(a+)+" or "(\\s*)*": the
# classic catastrophic-backtracking shape (reliability D4). Real pre-tokenizer patterns (GPT-2, o200k,
# Llama 3, Qwen) never contain it.
_NESTED_QUANTIFIER = re.compile(r"\((?:[^()\\]|\\.)*(?:[+*]|\{\d*,\})\)(?:[+*]|\{\d*,\d*\})")


def _check_patterns(node, where: str, depth: int = 0) -> None:
    """Reject regex patterns with nested unbounded quantifiers anywhere under ``node`` (D4)."""
    if depth > 32:
        return
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "Regex" and isinstance(value, str) and _NESTED_QUANTIFIER.search(value):
                raise FormatError(f"{where}: regex {value[:80]!r} repeats a group that ends in an unbounded "
                                  f"quantifier (catastrophic backtracking); refusing it")
            _check_patterns(value, where, depth + 1)
    elif isinstance(node, list):
        for value in node:
            _check_patterns(value, where, depth + 1)


def _read_tokenizer_config(path: str | None) -> dict:
    if path is None or not os.path.isfile(path):
        return {}
    data = read_json_file(path, path, FormatError, MAX_CONFIG_BYTES)
    if not isinstance(data, dict):
        raise FormatError(f"{path}: expected a JSON object at the top level")
    return data


# -- o200k_harmony via tiktoken ----------------------------------------------------------------
class HarmonyTokenizer(Tokenizer):
    """o200k_harmony built with ``tiktoken`` from a local ``o200k_base.tiktoken`` (see module doc)."""

    def __init__(self, tiktoken_file: str):
        try:
            import tiktoken
        except ImportError:
            raise FormatError("the o200k_harmony tokenizer needs the 'tiktoken' package "
                              "(pip install 'gptevo[harmony]')") from None
        self.source = tiktoken_file
        ranks = read_tiktoken_file(tiktoken_file)
        specials = harmony_special_tokens()
        self._enc = tiktoken.Encoding(name="o200k_harmony", pat_str=O200K_PATTERN, mergeable_ranks=ranks,
                                      special_tokens=specials)
        self.vocab_size = HARMONY_VOCAB
        self.special_tokens = specials
        self.eos_token_ids = HARMONY_EOS
        self.bos_token_id = HARMONY_NAMED["<|startoftext|>"]
        self._specials = set(specials.values())

    def encode(self, text: str, *, add_special_tokens: bool = True, allow_special: bool = True) -> list[int]:
        text = _check_text(text)
        if allow_special:
            return self._enc.encode(text, allowed_special="all")
        return self._enc.encode(text, disallowed_special=())

    def decode(self, ids, *, skip_special_tokens: bool = False) -> str:
        ids = self._check_ids(ids)
        if skip_special_tokens:
            ids = [t for t in ids if t not in self._specials]
        return self._enc.decode(ids)

    def decode_bytes(self, ids) -> bytes:
        return self._enc.decode_bytes(self._check_ids(ids))


def read_tiktoken_file(path: str) -> dict[bytes, int]:
    """Ranks of a ``.tiktoken`` file (lines ``base64(token) rank``), checked against o200k's SHA-256."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_TIKTOKEN_BYTES + 1)
    except OSError as exc:
        raise FormatError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if len(data) > MAX_TIKTOKEN_BYTES:
        raise FormatError(f"{path}: larger than {MAX_TIKTOKEN_BYTES} bytes; not an o200k_base.tiktoken file")
    digest = hashlib.sha256(data).hexdigest()
    if digest != O200K_SHA256:
        raise FormatError(f"{path}: SHA-256 {digest} is not that of o200k_base.tiktoken ({O200K_SHA256})")
    ranks: dict[bytes, int] = {}
    for n, line in enumerate(data.splitlines(), 1):
        if not line:
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (ValueError, binascii.Error):
            raise FormatError(f"{path}: line {n} is not 'base64 rank'") from None
    return ranks


def tiktoken_candidates(model_dir: str | None, encodings_base: str | None = None,
                        cache_dir: str | None = None) -> list[str]:
    """Where an ``o200k_base.tiktoken`` file is looked for, in order (see module doc)."""
    out = []
    if encodings_base:
        base = os.fspath(encodings_base)
        out.append(base if base.endswith(".tiktoken") else os.path.join(base, O200K_FILE))
    if model_dir is not None:
        out.append(os.path.join(os.fspath(model_dir), O200K_FILE))
    cache = os.fspath(cache_dir) if cache_dir else os.path.join(tempfile.gettempdir(), "data-gym-cache")
    out.append(os.path.join(cache, hashlib.sha1(O200K_URL.encode()).hexdigest()))
    return out


def load_harmony_tokenizer(model_dir: str | None = None, *, encodings_base: str | None = None,
                           cache_dir: str | None = None) -> HarmonyTokenizer:
    """The o200k_harmony tokenizer from the first existing candidate file (never the network)."""
    candidates = tiktoken_candidates(model_dir, encodings_base, cache_dir)
    for path in candidates:
        if os.path.isfile(path):
            return HarmonyTokenizer(path)
    raise FormatError("the o200k_harmony tokenizer needs o200k_base.tiktoken (sha256 " + O200K_SHA256[:12] +
                      "...), found in none of: " + ", ".join(candidates) +
                      ". Put the file in one of these places or pass encodings_base= "
                      "(the command line reads TIKTOKEN_ENCODINGS_BASE)")


# -- choosing ------------------------------------------------------------------------------------
def load_tokenizer(model_dir, *, vocab_size: int | None = None, encodings_base: str | None = None,
                   cache_dir: str | None = None) -> Tokenizer:
    """The tokenizer of a model directory: ``tokenizer.json``, else o200k_harmony for gpt-oss.

    vocab_size: the model's embedding rows; ids at or beyond it are an error (D1). When None it is
    read from the directory's config (if there is one).
    """
    root = os.fspath(model_dir)
    if not os.path.isdir(root):
        raise FormatError(f"{root}: not a model directory")
    path = os.path.join(root, "tokenizer.json")
    config = None
    if vocab_size is None or not os.path.isfile(path):
        config = _config_or_none(root)
        if vocab_size is None and config is not None:
            vocab_size = config.vocab_size
    if os.path.isfile(path):
        return HFTokenizer(path, vocab_size=vocab_size, config_path=os.path.join(root, "tokenizer_config.json"))
    if config is not None and config.family == "gpt_oss":
        tok = load_harmony_tokenizer(root, encodings_base=encodings_base, cache_dir=cache_dir)
        if vocab_size is not None and tok.vocab_size > vocab_size:
            raise FormatError(f"{tok.source}: o200k_harmony has {tok.vocab_size} ids, beyond the model's "
                              f"vocab_size={vocab_size}")
        return tok
    raise FormatError(f"{root}: no tokenizer.json (and not a gpt-oss model, whose o200k_harmony tokenizer "
                      f"could be used); pass token ids instead of text")


def _config_or_none(root: str):
    from gptevo.config_adapters import load_config
    from gptevo.model_files import locate

    if locate(root).config_path is None:
        return None
    return load_config(root)


def special_ids(tokenizer: Tokenizer, names: Iterable[str]) -> dict[str, int] | None:
    """``{name: id}`` when the tokenizer has every token in ``names``, else None."""
    out = {}
    for name in names:
        t = tokenizer.token_to_id(name)
        if t is None:
            return None
        out[name] = t
    return out
