"""cluster.yaml and the KubeRay manifests: valid for Ray / KubeRay, and consistent with the code.

The cluster launcher config goes through Ray's own offline path (`prepare_config` fills the AWS
defaults, `validate_config` checks the JSON schema); no cloud call is made.
"""
from __future__ import annotations

import copy
import importlib.util
import json
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from student.cluster_resources import STUDENT_RESOURCE, student_resources
from teacher_service.app import PLACEMENT_RESOURCE

ROOT = Path(__file__).resolve().parents[1]
KUBERAY = ROOT / "docs" / "kuberay"
POOLS = {"teacher_gpu": "teacher-gpu", "student_gpu": "student-gpu"}  # Ray resource -> KubeRay group


@pytest.fixture(scope="module")
def cluster() -> dict:
    cfg = prepare_config(yaml.safe_load((ROOT / "cluster.yaml").read_text()))
    validate_config(cfg)
    return cfg


def test_cluster_yaml_validates_and_has_the_two_pools(cluster):
    types = cluster["available_node_types"]
    assert cluster["head_node_type"] == "head" and set(types) == {"head", *POOLS}
    assert types["head"]["resources"] == {"CPU": 0}  # nothing that asks for a CPU lands on the head
    for pool in POOLS:
        t = types[pool]
        assert t["resources"][pool] == t["resources"]["GPU"] >= 1  # one unit of the pool per GPU
        assert 1 <= t["min_workers"] <= t["max_workers"]  # >= 1: "auto" placement sees the pool
        assert not (set(t["resources"]) & (set(POOLS) - {pool}))  # a pool never advertises the other
    assert sum(types[p]["max_workers"] for p in POOLS) <= cluster["max_workers"]
    assert any("pip install -e ." in c for c in cluster["setup_commands"])
    assert cluster["file_mounts"]["~/mod-distill"] == "."


def test_the_code_targets_the_pools_cluster_yaml_defines(cluster):
    assert PLACEMENT_RESOURCE == "teacher_gpu" and STUDENT_RESOURCE == "student_gpu"
    head_and_pools = {k: v["resources"] for k, v in cluster["available_node_types"].items()}
    total = {}
    for res in head_and_pools.values():
        for k, v in res.items():
            total[k] = total.get(k, 0) + v
    assert student_resources(total) == {"student_gpu": 1.0, "GPU": 1.0}


def test_validation_is_real(cluster):
    bad = copy.deepcopy(yaml.safe_load((ROOT / "cluster.yaml").read_text()))
    bad["available_node_types"]["teacher_gpu"]["min_worker"] = 1  # typo: not in the schema
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(bad))
    bad = copy.deepcopy(yaml.safe_load((ROOT / "cluster.yaml").read_text()))
    bad["max_workers"] = 1  # smaller than the pools' min_workers
    with pytest.raises(ValueError, match="max_workers"):
        validate_config(prepare_config(bad))


def test_student_resources():
    assert student_resources({"CPU": 8, "GPU": 4, "student_gpu": 4}) == {"student_gpu": 1.0, "GPU": 1.0}
    assert student_resources({"CPU": 8, "student_gpu": 2}) == {"student_gpu": 1.0}  # CPU pool (tests)
    assert student_resources({"CPU": 8, "GPU": 4}) == {}  # no pool: the trainer's own defaults
    assert student_resources(None) == {}
    assert student_resources({"CPU": 8, "student_gpu": 0}) == {}
    assert student_resources({"CPU": 8}, placement="require") == {"student_gpu": 1.0}
    assert student_resources({"GPU": 4, "student_gpu": 4}, placement="off") == {}
    with pytest.raises(ValueError, match="placement"):
        student_resources({}, placement="sometimes")


# ----------------------------------------------------------------------------------------------
# KubeRay


def _load(name: str) -> dict:
    return yaml.safe_load((KUBERAY / name).read_text())


def _groups(cluster_spec: dict) -> dict[str, dict]:
    """{group name: {resources from rayStartParams, gpus, min, max}} of a RayCluster spec."""
    out = {}
    for g in cluster_spec["workerGroupSpecs"]:
        raw = g["rayStartParams"]["resources"]
        assert raw.startswith('"') and raw.endswith('"'), f"{g['groupName']}: KubeRay wants the JSON quoted"
        (unquoted,) = shlex.split(raw)  # KubeRay pastes it into `ray start --resources=...` in a shell
        (container,) = g["template"]["spec"]["containers"]
        limits = container["resources"]["limits"]
        out[g["groupName"]] = {
            "resources": json.loads(unquoted),
            "gpus": int(limits["nvidia.com/gpu"]),
            "min": g["minReplicas"],
            "max": g["maxReplicas"],
            "replicas": g["replicas"],
        }
    return out


def _check_cluster_spec(spec: dict, cluster: dict) -> None:
    assert spec["rayVersion"] == "2.60.0"
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    groups = _groups(spec)
    assert set(groups) == set(POOLS.values())
    for pool, group in POOLS.items():
        g, t = groups[group], cluster["available_node_types"][pool]
        assert g["resources"] == {pool: t["resources"][pool]}
        assert g["gpus"] == t["resources"]["GPU"]
        assert (g["min"], g["max"]) == (t["min_workers"], t["max_workers"])
        assert g["min"] <= g["replicas"] <= g["max"]


def test_kuberay_raycluster_matches_cluster_yaml(cluster):
    rc = _load("raycluster.yaml")
    assert rc["apiVersion"] == "ray.io/v1" and rc["kind"] == "RayCluster"
    _check_cluster_spec(rc["spec"], cluster)


def test_kuberay_rayservice_serves_the_teacher_in_its_pool(cluster):
    from ray.serve.schema import ServeDeploySchema

    svc = _load("rayservice.yaml")
    assert svc["kind"] == "RayService"
    _check_cluster_spec(svc["spec"]["rayClusterConfig"], cluster)
    serve_cfg = ServeDeploySchema.model_validate(yaml.safe_load(svc["spec"]["serveConfigV2"]))
    (app,) = serve_cfg.applications
    assert app.name == "teacher" and app.route_prefix is None  # handle-only, like the CLI's default
    # The builder the manifest names binds a real app whose replicas ask for the teacher pool.
    spec = importlib.util.spec_from_file_location("teacher_app", KUBERAY / "teacher_app.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert app.import_path == "teacher_app:app"
    bound = mod.app(app.args)
    opts = bound._bound_deployment.ray_actor_options
    assert opts["resources"] == {PLACEMENT_RESOURCE: 1.0} and opts["num_gpus"] == 1.0


def test_kuberay_rayjob_runs_a_student_on_the_shared_cluster():
    job = _load("rayjob-student.yaml")
    assert job["kind"] == "RayJob"
    assert job["spec"]["clusterSelector"] == {"ray.io/cluster": _load("raycluster.yaml")["metadata"]["name"]}
    assert job["spec"]["shutdownAfterJobFinishes"] is False
    entry = job["spec"]["entrypoint"].split()
    assert entry[:3] == ["python", "-m", "student.train"]
    assert entry[entry.index("--teacher") + 1] == yaml.safe_load(_load("rayservice.yaml")["spec"]["serveConfigV2"])["applications"][0]["name"]
