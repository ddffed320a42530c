"""Serve application builder for the teacher under KubeRay's RayService (serveConfigV2 `import_path`).

Serve calls an application builder with ONE argument, the `args` dict of the Serve config; this maps
it onto `teacher_service.app.ServiceConfig` (the same fields as `python -m teacher_service deploy`)
and binds the app. The Dockerfile beside this file puts it on PYTHONPATH as the module `teacher_app`.
"""
from __future__ import annotations

from teacher_service.app import ServiceConfig, build_app
from teacher_service.protocol import Limits


def app(args: dict):
    """args: ServiceConfig fields (model required); `autoscale` as "MIN:MAX", `max_tokens` for Limits."""
    a = dict(args)
    if "model" not in a:
        raise ValueError("teacher_app: args.model (a checkpoint directory on every teacher node) is required")
    if isinstance(a.get("autoscale"), str):
        lo, hi = a["autoscale"].split(":")
        a["autoscale"] = (int(lo), int(hi))
    if "max_tokens" in a:
        a["limits"] = Limits(max_tokens=int(a.pop("max_tokens")))
    return build_app(ServiceConfig(**a))
