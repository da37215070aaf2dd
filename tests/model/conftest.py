"""Session fixtures for the peer tests: tiny checkpoints built once per session, with their peers.

Without torch / transformers (or gpt_oss for the original-layout fixture) the tests that need them
SKIP with the reason; they never pass silently. Everything is seeded (torch, numpy, fixture names).
"""
from __future__ import annotations

import random

import numpy as np
import pytest

from _builders import peer_fixtures   # imports no torch at module level

require = peer_fixtures.require


@pytest.fixture(scope="session")
def peer_checkpoints(tmp_path_factory):
    """``get(name) -> peer_fixtures.Built``: builds fixture ``name`` on first use (skips when a
    library it needs is missing) and caches it for the session."""
    cache: dict[str, object] = {}
    root = tmp_path_factory.mktemp("peer_checkpoints")

    def get(name: str):
        spec = peer_fixtures.FIXTURES[name]
        for module in spec.needs:
            require(module)
        if name not in cache:
            import torch
            torch.manual_seed(peer_fixtures.seed_of(name))
            np.random.seed(peer_fixtures.seed_of(name))
            random.seed(peer_fixtures.seed_of(name))
            torch.set_num_threads(min(2, torch.get_num_threads()))
            with torch.no_grad():
                cache[name] = peer_fixtures.build_fixture(name, root / name)
        return cache[name]

    return get


@pytest.fixture(scope="session")
def our_models():
    """``get(built) -> gptevo model`` (reference backend), loaded once per fixture."""
    cache: dict[str, object] = {}

    def get(built):
        if built.name not in cache:
            import gptevo
            cache[built.name] = gptevo.load(str(built.path), backend="reference")
        return cache[built.name]

    return get
