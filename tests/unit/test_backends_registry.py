"""The backend registry: listing, selection, clear errors, no silent fallback."""
import subprocess
import sys

import pytest

import gptevo
from gptevo import backends


def test_reference_is_available_and_has_every_backend_op():
    from gptevo.ops import REGISTRY

    avail = backends.available()
    assert "reference" in avail
    ref = backends.get("reference")
    assert ref.missing(n for n, s in REGISTRY.items() if s.backend_op) == []


def test_unavailable_backends_come_with_a_reason():
    avail = backends.available()
    for name in backends.known():
        assert (name in avail) != (name in avail.unavailable)
        if name in avail.unavailable:
            assert isinstance(avail.unavailable[name], str) and avail.unavailable[name]


def test_unknown_backend_is_a_clear_error():
    with pytest.raises(gptevo.BackendError, match="unknown backend 'nope'"):
        backends.get("nope")


def test_unavailable_backend_is_an_error_not_a_fallback():
    avail = backends.available()
    for name, reason in avail.unavailable.items():
        with pytest.raises(gptevo.BackendError, match="not available") as excinfo:
            backends.get(name)
        assert reason in str(excinfo.value)


def test_missing_ops_are_listed():
    b = backends.Backend("partial", {"rms_norm": lambda **kw: None})
    with pytest.raises(gptevo.BackendError, match="attention"):
        b.require(["rms_norm", "attention", "softmax"])


def test_env_var_selects_backend(monkeypatch):
    monkeypatch.setenv("GPTEVO_BACKEND", "reference")
    assert backends.resolve(None).name == "reference"
    monkeypatch.setenv("GPTEVO_BACKEND", "nope")
    with pytest.raises(gptevo.BackendError):
        backends.resolve(None)


def test_import_is_light():
    code = ("import sys, gptevo, gptevo.ops; "
            "bad = [m for m in ('torch', 'numba', 'cupy', 'transformers') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_missing_op_attribute_is_a_backend_error_and_an_attribute_error():
    b = backends.Backend("partial", {"rms_norm": lambda **kw: None})
    assert hasattr(b, "rms_norm") and not hasattr(b, "attention")
    with pytest.raises(gptevo.BackendError, match="no op 'attention'"):
        _ = b.attention


def test_default_is_the_fastest_cpu_backend(monkeypatch):
    monkeypatch.delenv("GPTEVO_BACKEND", raising=False)
    expected = "numba" if "numba" in backends.available() else "reference"
    assert backends.default_name() == expected
    assert backends.resolve(None).name == expected


def test_default_without_numba_is_the_reference(monkeypatch):
    monkeypatch.delenv("GPTEVO_BACKEND", raising=False)
    monkeypatch.setattr(backends, "_why_unavailable", lambda name: "not installed" if name == "numba" else None)
    assert backends.default_name() == "reference"
