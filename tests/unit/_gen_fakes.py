"""Test doubles for generation, chat and CLI tests: tiny models and a byte-level tokenizer.json.

FakeModel has the interface of gptevo.model.Model that generation uses (config, path, new_cache,
forward, logits) with deterministic, history-dependent logits from a seeded table. Its cache
refuses any write beyond ``max_tokens`` or the context, so an out-of-bounds KV write fails loudly.
ScriptedModel emits a fixed token script (then its eos), so a test knows the exact output.
"""
from __future__ import annotations

import json

import numpy as np

from gptevo.config import ModelConfig


def gpt2_byte_chars() -> list[str]:
    """GPT-2's printable stand-in for each byte 0..255 (written from its definition: printable
    Latin-1 bytes stand for themselves; the remaining bytes take U+0100.. in increasing order)."""
    printable = [b for b in range(256) if 33 <= b <= 126 or 161 <= b <= 172 or 174 <= b <= 255]
    others = [b for b in range(256) if b not in printable]
    chars = [""] * 256
    for b in printable:
        chars[b] = chr(b)
    for i, b in enumerate(others):
        chars[b] = chr(256 + i)
    return chars


def byte_tokenizer_json(specials=("<|endoftext|>",), merges=(("h", "e"), ("l", "l"))) -> dict:
    """A byte-level BPE tokenizer.json: id b = byte b, then merged tokens, then special tokens."""
    chars = gpt2_byte_chars()
    vocab = {chars[b]: b for b in range(256)}
    for a, b in merges:
        vocab[a + b] = len(vocab)
    added = []
    for s in specials:
        added.append({"id": len(vocab) + len(added), "content": s, "single_word": False, "lstrip": False,
                      "rstrip": False, "normalized": False, "special": True})
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
            "pre_tokenizer": byte_level, "post_processor": None, "decoder": dict(byte_level),
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                      "ignore_merges": False, "vocab": vocab, "merges": [f"{a} {b}" for a, b in merges]}}


def vocab_size_of(tokenizer_json: dict) -> int:
    return len(tokenizer_json["model"]["vocab"]) + len(tokenizer_json["added_tokens"])


def write_tokenizer(directory, tokenizer_json: dict | None = None) -> str:
    path = directory / "tokenizer.json"
    path.write_text(json.dumps(tokenizer_json or byte_tokenizer_json()))
    return str(path)


def tiny_config(vocab_size: int, context: int = 64, eos=()) -> ModelConfig:
    return ModelConfig(family="llama", vocab_size=vocab_size, hidden_size=8, num_layers=1, num_heads=1,
                       num_kv_heads=1, head_dim=8, intermediate_size=8, max_position_embeddings=context,
                       eos_token_ids=tuple(eos))


class FakeCache:
    def __init__(self, max_tokens: int, context: int):
        if max_tokens > context:
            raise AssertionError(f"cache of {max_tokens} > context {context}")
        self.max_tokens = max_tokens
        self.tokens: list[int] = []

    @property
    def length(self) -> int:
        return len(self.tokens)


class FakeModel:
    """Logits of position t: ``3 * A[ids[t]] + 2 * B[ids[t-1]]`` (seeded tables; non-degenerate)."""

    def __init__(self, vocab_size: int, context: int = 128, eos=(), seed: int = 0, tokenizer=None):
        self.config = tiny_config(vocab_size, context, eos)
        rng = np.random.default_rng(seed)
        self.A = rng.normal(size=(vocab_size, vocab_size))
        self.B = rng.normal(size=(vocab_size, vocab_size))
        self.path = None
        self.tokenizer = tokenizer
        self.forward_sizes: list[int] = []

    def _rows(self, ids: list[int]) -> np.ndarray:
        rows = [3 * self.A[t] + (2 * self.B[ids[i - 1]] if i else 0) for i, t in enumerate(ids)]
        return np.array(rows, dtype=np.float32)                                     # [T,V]

    def logits(self, ids) -> np.ndarray:
        return self._rows([int(t) for t in ids])

    def new_cache(self, max_tokens: int) -> FakeCache:
        return FakeCache(max_tokens, self.config.max_position_embeddings)

    def forward(self, ids, cache: FakeCache) -> np.ndarray:
        ids = [int(t) for t in ids]
        if cache.length + len(ids) > cache.max_tokens:
            raise AssertionError(f"KV write beyond the cache: {cache.length} + {len(ids)} > {cache.max_tokens}")
        cache.tokens += ids
        self.forward_sizes.append(len(ids))
        return self._rows(cache.tokens)[-len(ids):]


class ScriptedModel(FakeModel):
    """Emits ``script`` token by token (a +20 logit), then ``after`` forever."""

    def __init__(self, vocab_size: int, script, after: int = 0, context: int = 128, eos=(), tokenizer=None,
                 nan_at: int | None = None):
        super().__init__(vocab_size, context, eos, tokenizer=tokenizer)
        self.script, self.after, self.nan_at = list(script), after, nan_at
        self.prompt_len = None

    def forward(self, ids, cache: FakeCache) -> np.ndarray:
        if cache.length == 0:
            self.prompt_len = len(ids)
        out = super().forward(ids, cache)
        step = cache.length - self.prompt_len                   # tokens generated so far
        target = self.script[step] if step < len(self.script) else self.after
        out[-1] = 0.0
        out[-1, target] = 20.0
        if self.nan_at is not None and step >= self.nan_at:
            out[-1, 3] = np.nan
        return out


# -- the real o200k vocabulary, from PyPI quicktok-v1 (offline) -----------------------------------
O200K_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"   # tiktoken's published hash


def quicktok_to_tiktoken(vocab_path, out_path) -> str:
    """Convert quicktok's ``o200k.vocab`` (little-endian: u32 count, then count x (u16 length, token
    bytes, u32 rank)) to tiktoken's format (``base64(token) rank`` lines in rank order)."""
    import base64
    import struct

    data = open(vocab_path, "rb").read()
    (count,) = struct.unpack_from("<I", data, 0)
    pos, entries = 4, []
    for _ in range(count):
        (n,) = struct.unpack_from("<H", data, pos)
        token = data[pos + 2:pos + 2 + n]
        (rank,) = struct.unpack_from("<I", data, pos + 2 + n)
        entries.append((rank, token))
        pos += 2 + n + 4
    if pos != len(data):
        raise ValueError(f"{vocab_path}: {len(data) - pos} trailing bytes")
    entries.sort()
    with open(out_path, "wb") as f:
        for rank, token in entries:
            f.write(base64.b64encode(token) + b" " + str(rank).encode() + b"\n")
    return str(out_path)


def o200k_dir(tmp_dir):
    """A directory holding o200k_base.tiktoken, or pytest.skip when quicktok-v1/tiktoken are absent."""
    import importlib.util
    import os

    import pytest

    pytest.importorskip("tiktoken", reason="tiktoken is not installed (pip install 'gptevo[test]')")
    spec = importlib.util.find_spec("quicktok")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("quicktok-v1 (the offline o200k vocabulary) is not installed (pip install 'gptevo[test]')")
    vocab = os.path.join(list(spec.submodule_search_locations)[0], "data", "o200k.vocab")
    if not os.path.isfile(vocab):
        pytest.skip(f"quicktok-v1 has no {vocab}")
    quicktok_to_tiktoken(vocab, tmp_dir / "o200k_base.tiktoken")
    return tmp_dir
