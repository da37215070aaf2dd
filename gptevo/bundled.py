"""Where the bundled model lives: ``gptevo/data/austen`` inside the installed package.

A 4.4M-parameter gpt-oss-architecture model trained on Jane Austen's novels (its README gives the
recipe, the measured perplexity and how its sampling defaults were chosen). ``gptevo.load()`` with no
path and the command line without ``--model`` use it.
"""
from __future__ import annotations

import os

from gptevo.errors import RequestError

BUNDLED = ("data", "austen")


def bundled_model_dir() -> str:
    """The directory of the bundled model, found with importlib.resources (RequestError when missing)."""
    from importlib.resources import files

    path = files("gptevo").joinpath(*BUNDLED)
    if not path.is_dir():
        raise RequestError(f"the bundled model is missing ({path}); pass a model directory "
                           f"(gptevo.load(path), or --model DIR on the command line)")
    return os.fspath(path)
