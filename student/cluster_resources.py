"""Which resources a student's Ray Train worker asks for: the `student_gpu` pool when the cluster has one.

cluster.yaml (and docs/kuberay/) give the student nodes a custom resource `student_gpu`, one unit per
GPU, and the teacher nodes `teacher_gpu`. Asking for one unit of `student_gpu` per worker keeps the
workers in their pool and off the teacher's GPUs. On a laptop or CI box the resource does not exist,
so by default ("auto") nothing is asked for and the run still starts: the same mirror image as the
teacher service's `teacher_service.app.placement_resources`.
"""
from __future__ import annotations

from collections.abc import Mapping

__all__ = ["STUDENT_RESOURCE", "student_resources"]

STUDENT_RESOURCE = "student_gpu"


def student_resources(
    cluster_resources: Mapping[str, float] | None,
    *,
    placement: str = "auto",
    resource: str = STUDENT_RESOURCE,
) -> dict[str, float]:
    """`resources_per_worker` for `ScalingConfig`: {"student_gpu": 1} (+ {"GPU": 1} on a GPU cluster) or {}.

    cluster_resources: `ray.cluster_resources()` of the cluster the run joins.
    placement: "auto" asks for the pool only when the cluster advertises it; "require" always does
    (workers wait until a student node joins, e.g. while the autoscaler adds one); "off" never does.
    GPU is added whenever the cluster has GPUs, so `ScalingConfig(use_gpu=bool(res.get("GPU")))`
    follows from the result.
    """
    if placement not in ("auto", "require", "off"):
        raise ValueError(f"placement: expected auto, require or off, got {placement!r}")
    have = dict(cluster_resources or {})
    out: dict[str, float] = {}
    if placement == "require" or (placement == "auto" and have.get(resource, 0) > 0):
        out[resource] = 1.0
    if out and have.get("GPU", 0) > 0:
        out["GPU"] = 1.0
    return out
