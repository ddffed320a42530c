"""Backend registry: a name ("hf", "vllm") -> a factory returning a TeacherBackend.

Factories are "module:attribute" strings resolved on first use, so asking for one backend never
imports another's dependencies (vLLM lives in its own environment, see the Makefile). A factory is
called as `factory(model, **options)`; see `TeacherBackend` for the options every backend accepts.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable

from teacher_service.backends.base import TeacherBackend

__all__ = ["TeacherBackend", "register_backend", "create_backend", "available_backends", "resolve_backend"]

# name -> "module:attribute" (resolved lazily) or a callable
_REGISTRY: dict[str, str | Callable[..., TeacherBackend]] = {
    "hf": "teacher_service.backends.hf:HFBackend",
    "vllm": "teacher_service.backends.vllm:VLLMBackend",
    "noop": "teacher_service.testing:NoopBackend",  # no forward: the service's own cost (bench/serve_cost.py)
}


def register_backend(name: str, factory: str | Callable[..., TeacherBackend], *, replace: bool = False) -> None:
    """Make `name` available to the deployment and the CLI. factory: a callable or "module:attribute"."""
    if name in _REGISTRY and not replace:
        raise ValueError(f"backend {name!r} is already registered")
    _REGISTRY[name] = factory


def available_backends() -> list[str]:
    return sorted(_REGISTRY)


def resolve_backend(name: str) -> Callable[..., TeacherBackend]:
    """The factory registered under `name`, importing its module now."""
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown teacher backend {name!r}; available: {available_backends()}") from None
    if isinstance(factory, str):
        module, _, attr = factory.partition(":")
        try:
            factory = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise ImportError(f"teacher backend {name!r} ({_REGISTRY[name]}) cannot be loaded here: {type(e).__name__}: {e}") from e
    return factory


def create_backend(name: str, model: str, **options) -> TeacherBackend:
    backend = resolve_backend(name)(model, **options)
    if not isinstance(backend, TeacherBackend):
        raise TypeError(f"backend {name!r} returned {type(backend).__name__}, not a TeacherBackend")
    return backend
