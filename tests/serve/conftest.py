"""Fixtures for the server tests (helpers in serve_helpers.py, which skips the test modules that import
it, with the reason, when the serve extra or the openai client is missing)."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session", params=["reference", "numba"])
def backend_server(request):
    """A server per backend on the bundled model (max batch 8), shared by the tests of that backend."""
    from serve_helpers import load_bundled, serve_app

    model = load_bundled(request.param)
    live = serve_app(model, max_batch=8, max_queue=16, max_tokens=512)
    yield live, model
    live.close()
