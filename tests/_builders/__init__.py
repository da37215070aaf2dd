"""Builders shared by tests and tools (tiny checkpoints, peer fixtures); no tests live here.

Imported as ``_builders`` (``tests/`` is on pytest's ``pythonpath``, pyproject.toml); tools put
``tests/`` on ``sys.path`` themselves.
"""
