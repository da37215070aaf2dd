"""Whole-model logits of the reference backend vs the peers, on tiny random checkpoints.

Peers: Hugging Face transformers (float32, eager attention) for every HF-layout fixture, and the
official gpt-oss torch code (``gpt_oss.torch.model.Transformer``, float32) for the original gpt-oss
layout. Fixtures: ``peer_fixtures.FIXTURES`` (real on-disk layouts, written by the peer libraries).

Checks, per fixture:
- full-sequence ``logits(ids)`` vs the peer: max |ours - peer| <= 1e-4 * max |peer|; on failure the
  message names the first diverging layer (``model.trace`` vs the peer's hidden states);
- KV-cache decode: ``new_cache`` + ``forward`` token by token (and prefill + decode) vs the peer's own
  cached decode (HF ``past_key_values``; the official gpt-oss code has no cache and re-runs the prefix,
  which by causality equals its full-sequence rows);
- the fixture is what the peer itself reads: ``from_pretrained`` of the written directory reproduces the
  in-memory peer exactly (guards the fixtures against transformers-version drift);
- loading and running a checkpoint never imports torch (subprocess).
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from _builders import peer_fixtures
from _builders.peer_fixtures import have, require

pytestmark = pytest.mark.peer

REL_TOL = 1e-4                      # max |diff| <= REL_TOL * max |peer| (facts hf_families §11: 1e-4 abs)
NAMES = list(peer_fixtures.FIXTURES)
REPO = Path(__file__).resolve().parents[2]


# -- diagnostics -------------------------------------------------------------------------------
def _rel_err(a: np.ndarray, b: np.ndarray) -> float:
    scale = max(float(np.max(np.abs(b))), 1e-30)
    return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))) / scale


def first_divergence(model, built) -> str:
    """Name where our ``model.trace`` first leaves the peer's hidden states.

    Each peer state (a residual stream [T, H]) is matched with the trace tensors of the same shape;
    the first peer state that no trace tensor reproduces within REL_TOL is the divergence, and the
    trace tensors computed after the last matching one are the suspects."""
    ids = built.ids
    try:
        trace = {k: np.asarray(v) for k, v in model.trace(ids).items()}
    except Exception as e:  # noqa: BLE001 - a diagnostic must not hide the original failure
        return f"(model.trace failed: {type(e).__name__}: {e})"
    try:
        states = built.peer.states(ids)
    except Exception as e:  # noqa: BLE001
        return f"(peer hidden states failed: {type(e).__name__}: {e})"
    names = list(trace)
    last_ok = -1
    lines = []
    for pname, ref in states:
        ref = ref.reshape(len(ids), -1)
        cands = [(_rel_err(trace[k].reshape(ref.shape), ref), k) for k in names
                 if trace[k].size == ref.size]
        if not cands:
            lines.append(f"peer {pname!r}: no trace tensor of {ref.size} elements")
            continue
        err, key = min(cands)
        if err <= REL_TOL:
            last_ok = max(last_ok, names.index(key))
            lines.append(f"peer {pname!r} == trace {key!r} (rel err {err:.1e})")
            continue
        suspects = names[last_ok + 1:last_ok + 6]
        lines = lines[-4:]
        lines.append(f"FIRST DIVERGENCE at peer {pname!r}: closest trace tensor {key!r} rel err {err:.2e}; "
                     f"first trace tensors after the last match: {suspects}")
        return "\n".join(lines)
    lines.append("every peer hidden state matched; the difference is after the last one (lm head?)")
    return "\n".join(lines)


def assert_close(ours, ref, what: str, model, built) -> None:
    ours = np.asarray(ours)
    assert ours.shape == ref.shape, f"{built.name}: {what} shape {ours.shape}, peer {ref.shape}"
    assert ours.dtype == np.float32, f"{built.name}: {what} dtype {ours.dtype}, expected float32"
    diff = np.abs(ours.astype(np.float64) - ref.astype(np.float64))
    tol = REL_TOL * float(np.max(np.abs(ref)))
    err = float(np.max(diff)) if np.all(np.isfinite(ours)) else float("inf")
    if err <= tol:
        return
    t, v = np.unravel_index(int(np.nanargmax(np.where(np.isfinite(diff), diff, np.inf))), diff.shape)
    msg = (f"{built.name} ({built.family}): {what} max |ours - peer| = {err:.3e} > {tol:.3e} "
           f"(= {REL_TOL} * max|peer|) at position {t}, vocab {v}; first bad position "
           f"{int(np.argmax(diff.max(axis=1) > tol))} of {ref.shape[0]}\n" + first_divergence(model, built))
    pytest.fail(msg)


# -- tests -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_logits_match_peer(name, peer_checkpoints, our_models):
    built = peer_checkpoints(name)
    model = our_models(built)
    ref = built.peer.logits(built.ids)                                   # [T, V] float32
    assert_close(model.logits(built.ids), ref, "logits", model, built)


@pytest.mark.parametrize("name", NAMES)
def test_decode_token_by_token_matches_peer(name, peer_checkpoints, our_models):
    built = peer_checkpoints(name)
    model = our_models(built)
    ref = built.peer.decode_logits(built.ids, prefill=1)                 # [T, V]
    cache = model.new_cache(len(built.ids))
    rows = [np.asarray(model.forward([tok], cache)).reshape(-1, ref.shape[1])[-1] for tok in built.ids]
    assert_close(np.stack(rows), ref, "token-by-token decode logits", model, built)


@pytest.mark.parametrize("name", NAMES)
def test_prefill_then_decode_matches_peer(name, peer_checkpoints, our_models):
    built = peer_checkpoints(name)
    model = our_models(built)
    k = len(built.ids) // 2
    ref = built.peer.decode_logits(built.ids, prefill=k)                 # [T, V]
    cache = model.new_cache(len(built.ids))
    parts = [np.asarray(model.forward(built.ids[:k], cache)).reshape(k, -1)]
    parts += [np.asarray(model.forward([tok], cache)).reshape(1, -1) for tok in built.ids[k:]]
    assert_close(np.concatenate(parts), ref, f"prefill({k}) + decode logits", model, built)


@pytest.mark.parametrize("name", [n for n in NAMES if "transformers" in peer_fixtures.FIXTURES[n].needs])
def test_fixture_is_what_transformers_reads(name, peer_checkpoints):
    """``from_pretrained`` on the written directory gives the in-memory peer's logits exactly: the
    fixture's tensors and (4.x-style, rewritten) config.json mean to HF what the peer computes."""
    built = peer_checkpoints(name)
    import torch
    from transformers import AutoModelForCausalLM
    kw = {}
    if built.family == "gpt_oss":
        from transformers import Mxfp4Config
        kw["quantization_config"] = Mxfp4Config(dequantize=True)   # CPU: no MXFP4 kernels
    reloaded = AutoModelForCausalLM.from_pretrained(built.path, dtype=torch.float32,
                                                    attn_implementation="eager", **kw)
    got = peer_fixtures.HFPeer(reloaded).logits(built.ids)
    want = built.peer.logits(built.ids)
    assert np.max(np.abs(got - want)) <= 1e-6 * np.max(np.abs(want)), \
        f"{name}: transformers reads the written checkpoint differently from the model that wrote it"


def test_loading_never_imports_torch(peer_checkpoints):
    """In a fresh interpreter: load every fixture and score a few tokens; torch never gets imported."""
    dirs = []
    for name in NAMES:
        spec = peer_fixtures.FIXTURES[name]
        if all(have(m) for m in spec.needs):
            dirs.append(str(peer_checkpoints(name).path))
    if not dirs:
        require("torch")
    script = textwrap.dedent("""
        import sys
        import gptevo
        dirs = sys.argv[1:]
        gptevo.load(dirs[0]).logits([1, 2, 3])                      # the default backend choice
        for d in dirs:
            gptevo.load(d, backend="reference").logits([1, 2, 3])
        heavy = sorted(m for m in ("torch", "transformers", "gpt_oss") if m in sys.modules)
        assert not heavy, f"loading imported {heavy}"
        print("ok", len(dirs))
    """)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p])
    proc = subprocess.run([sys.executable, "-c", script, *dirs], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, f"subprocess failed:\n{proc.stdout}\n{proc.stderr[-3000:]}"
    assert proc.stdout.strip() == f"ok {len(dirs)}"
