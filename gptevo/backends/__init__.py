"""The backend registry.

A backend is a named set of op implementations with the same names and keyword signatures as the
reference ops in :mod:`gptevo.ops`. ``model.py`` calls ops only through a backend, so adding a
backend never touches model code.

The one validation layer: :class:`Backend` puts each op's argument check (``OpSpec.check``, next to
its reference in ``gptevo/ops/``) in front of the backend's implementation, so every call through a
backend (the model's, the conformance suite's, a plug-in's) is checked exactly once before
dispatch, and implementations receive canonical arguments and contain no checks of their own.

Built-in backends are listed in :data:`BUILTIN` (name -> module to probe, import path, priority).
Availability is checked without importing heavy modules (``importlib.util.find_spec``) plus a cheap
probe in the backend's own module. Third-party backends register through the entry-point group
``gptevo.backends``: the entry point loads an object (usually a module) with a ``OPS`` mapping of op
name to callable and an optional ``probe()`` returning ``None`` when usable or a reason string.

Selection (:func:`resolve`, :func:`default_name`): the explicit name, then the ``GPTEVO_BACKEND``
environment variable (read by :func:`default_name`, and by the command line for ``--backend``), then
the fastest available CPU backend: ``numba`` when it is installed and its probe passes, else
``reference``. The GPU backend (``cupy``) is never chosen implicitly. Asking for an unavailable
backend is an error that says why; there is never a silent fallback.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
from dataclasses import dataclass
from types import MappingProxyType
from typing import Callable, Iterable, Mapping

from gptevo.errors import BackendError

ENTRY_POINT_GROUP = "gptevo.backends"
ENV_VAR = "GPTEVO_BACKEND"


@dataclass(frozen=True)
class BuiltinBackend:
    requires: tuple[str, ...]   # top-level modules that must be importable (checked with find_spec)
    import_path: str            # module holding OPS and probe()
    priority: int               # higher wins when no backend is named


BUILTIN: dict[str, BuiltinBackend] = {
    "reference": BuiltinBackend((), "gptevo.backends.reference", 0),
    "numba": BuiltinBackend(("numba",), "gptevo.backends.numba", 10),
    "cupy": BuiltinBackend(("cupy",), "gptevo.backends.cupy", 20),
}


class MissingOpError(BackendError, AttributeError):
    """A backend lacks an op; also an AttributeError so ``hasattr(backend, op)`` works."""


class Backend:
    """A loaded backend: ``backend.rms_norm(...)`` checks the arguments, then calls that backend's
    implementation.

    ``ops`` maps op names to the checked callables (what the model and the conformance suite call);
    ``impls`` to the implementations as the backend gave them (canonical arguments only, no checks).
    An op name the registry does not know (a plug-in's extra) is passed through unchecked; an op
    given as an already checked callable (a public reference function, another backend's ``ops``)
    is unwrapped first, so a check never runs twice.
    ``prepare_weights(weights, config, mode) -> weights`` is the backend module's optional load-time
    hook (fused projections, resident pages, its own layouts; see gptevo.prepare); ``mode`` is the
    load's weight mode ("stored" or "int8"). None when absent.
    ``decode_program(config, weights, dtype) -> step | None`` is the optional fused one-token decode
    hook: ``step(token, cache)`` returns logits ``[1, V]`` (or None to let the ops run) and updates the
    cache as the ops would (see Model.forward_on_backend). None when absent.
    """

    def __init__(self, name: str, ops: Mapping[str, Callable], prepare_weights: Callable | None = None,
                 decode_program: Callable | None = None):
        from gptevo.ops import REGISTRY
        from gptevo.ops.spec import unchecked, validated

        self.name = name
        self.impls = MappingProxyType({op: unchecked(fn) for op, fn in ops.items()})
        checks = {op: REGISTRY[op].check if op in REGISTRY else None for op in self.impls}
        self.ops = MappingProxyType({op: fn if checks[op] is None else validated(checks[op], fn)
                                     for op, fn in self.impls.items()})
        self.prepare_weights = prepare_weights
        self.decode_program = decode_program

    def __getattr__(self, op_name: str) -> Callable:
        try:
            return self.__dict__["ops"][op_name]
        except KeyError:
            raise MissingOpError(f"backend {self.__dict__.get('name')!r} has no op {op_name!r}") from None

    def missing(self, op_names: Iterable[str]) -> list[str]:
        """The op names from ``op_names`` this backend does not implement, sorted."""
        return sorted(set(op_names) - set(self.ops))

    def require(self, op_names: Iterable[str], what: str = "this model") -> None:
        """Raise BackendError listing every op in ``op_names`` this backend lacks."""
        missing = self.missing(op_names)
        if missing:
            raise BackendError(f"backend {self.name!r} cannot run {what}: it lacks the ops {', '.join(missing)}")

    def __repr__(self) -> str:
        return f"<gptevo backend {self.name!r}: {len(self.ops)} ops>"


class Availability(list):
    """Names of the backends usable here, best first; ``.unavailable`` maps the others to the reason."""

    def __init__(self, usable: list[str], unavailable: dict[str, str]):
        super().__init__(usable)
        self.unavailable = unavailable

    def __repr__(self) -> str:
        why = "; ".join(f"{k}: {v}" for k, v in self.unavailable.items())
        return f"{list(self)!r} (unavailable: {why or 'none'})"


def _entry_points() -> dict[str, object]:
    try:
        from importlib.metadata import entry_points
    except ImportError:  # pragma: no cover
        return {}
    try:
        eps = entry_points(group=ENTRY_POINT_GROUP)
    except TypeError:  # Python < 3.10 API
        eps = entry_points().get(ENTRY_POINT_GROUP, [])
    return {ep.name: ep for ep in eps if ep.name not in BUILTIN}


def _why_unavailable(name: str) -> str | None:
    """None when backend ``name`` is usable here, else the reason in words."""
    if name in BUILTIN:
        spec = BUILTIN[name]
        for mod in spec.requires:
            if importlib.util.find_spec(mod) is None:
                return f"the Python package {mod!r} is not installed (pip install 'gptevo[{name}]')"
        try:
            module = importlib.import_module(spec.import_path)
        except ImportError as exc:
            return f"{spec.import_path} failed to import: {exc}"
        probe = getattr(module, "probe", None)
        return probe() if probe is not None else None
    eps = _entry_points()
    if name in eps:
        try:
            obj = eps[name].load()
        except Exception as exc:  # a broken plug-in must not break the registry
            return f"plug-in entry point {eps[name].value!r} failed to load: {exc!r}"
        probe = getattr(obj, "probe", None)
        try:
            return probe() if probe is not None else None
        except Exception as exc:
            return f"plug-in probe raised {exc!r}"
    return None


def known() -> list[str]:
    """Every backend name gptevo knows of: built-ins, then plug-ins."""
    return list(BUILTIN) + sorted(_entry_points())


def available() -> Availability:
    """The backends usable here, best first; ``available().unavailable`` gives the others with why."""
    usable, unavailable = [], {}
    for name in known():
        reason = _why_unavailable(name)
        if reason is None:
            usable.append(name)
        else:
            unavailable[name] = reason
    usable.sort(key=lambda n: -BUILTIN[n].priority if n in BUILTIN else 0)
    return Availability(usable, unavailable)


_LOADED: dict[str, Backend] = {}


def get(name: str) -> Backend:
    """Load backend ``name``; BackendError if it is unknown or unavailable here (with the reason)."""
    if not isinstance(name, str):
        raise BackendError(f"backend must be a name (str), got {type(name).__name__}")
    if name in _LOADED:
        return _LOADED[name]
    if name not in known():
        raise BackendError(f"unknown backend {name!r}; known backends: {', '.join(known())}")
    reason = _why_unavailable(name)
    if reason is not None:
        raise BackendError(f"backend {name!r} is not available here: {reason}")
    if name in BUILTIN:
        module = importlib.import_module(BUILTIN[name].import_path)
    else:
        module = _entry_points()[name].load()
    ops = getattr(module, "OPS", None)
    if not isinstance(ops, Mapping):
        raise BackendError(f"backend {name!r} does not define an OPS mapping")
    backend = Backend(name, ops, getattr(module, "prepare_weights", None), getattr(module, "decode_program", None))
    _LOADED[name] = backend
    return backend


def default_name() -> str:
    """The backend used when none is named: $GPTEVO_BACKEND, else the fastest available CPU backend
    (numba when it is installed and usable, else the reference). The GPU backend is never chosen
    implicitly: a GPU run is always asked for by name."""
    env = os.environ.get(ENV_VAR)
    if env:
        return env
    return "numba" if _why_unavailable("numba") is None else "reference"


def resolve(name: str | Backend | None = None) -> Backend:
    """The backend to use: ``name``, else :func:`default_name`.

    ``backend="reference"`` is the exact path (the NumPy reference of every op); numba, the default
    when installed, agrees with it within the conformance tolerances (spec/backends.md).
    """
    if isinstance(name, Backend):
        return name
    if name is None:
        name = default_name()
    return get(name)
