"""Fixtures for the server tests (helpers in serve_helpers.py)."""
from __future__ import annotations

import pytest

from serve_helpers import load_bundled, serve_app


@pytest.fixture(scope="session", params=["reference", "numba"])
def backend_server(request):
    """A server per backend on the bundled model (max batch 8), shared by the tests of that backend."""
    model = load_bundled(request.param)
    live = serve_app(model, max_batch=8, max_queue=16, max_tokens=512)
    yield live, model
    live.close()
