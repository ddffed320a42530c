"""Driver side of one stage: a Ray Train TorchTrainer whose workers run `worker.train_loop`.

Run names. Ray Train V2 resumes a run when a new one reuses its (name, storage_path), silently, so
every stage attempt gets its own name, recorded in RUN/stages/<stage>/run.json. `resume=True` reuses
the recorded name of an unfinished attempt, which makes Ray hand the workers its latest checkpoint;
otherwise a new name starts the stage from scratch. Checkpoints live under RUN/ray/<name>/.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from student.training.job import StageJob

__all__ = ["RESIZE_INTERVAL_S", "Workers", "ensure_ray", "parse_workers", "run_stage", "stage_run_name",
           "worker_resources"]

RESIZE_INTERVAL_S = 60.0  # Ray Train's default elastic_resize_monitor_interval_s


@dataclass(frozen=True)
class Workers:
    min: int
    max: int

    @property
    def elastic(self) -> bool:
        return self.min != self.max

    def scaling(self):
        return self.max if not self.elastic else (self.min, self.max)


def parse_workers(text: str | int) -> Workers:
    """'N' or 'MIN:MAX' (elastic) -> Workers."""
    s = str(text)
    try:
        lo, hi = (s.split(":", 1) if ":" in s else (s, s))
        w = Workers(int(lo), int(hi))
    except ValueError:
        raise ValueError(f"--workers: expected N or MIN:MAX (integers), got {text!r}") from None
    if not 1 <= w.min <= w.max:
        raise ValueError(f"--workers: need 1 <= MIN <= MAX, got {text!r}")
    return w


def worker_resources(use_gpu: bool, cluster_resources=None, placement: str = "auto") -> dict[str, float]:
    """`resources_per_worker` of a student's Train worker: one CPU (and one GPU with --gpu), plus one
    unit of the `student_gpu` pool where the cluster has it (`student.cluster_resources`), so students
    stay in their pool and off the teacher's nodes. The GPU follows --gpu, not the cluster: Ray Train
    refuses a GPU in `resources_per_worker` of a CPU run."""
    from student.cluster_resources import student_resources

    pool = {k: v for k, v in student_resources(cluster_resources, placement=placement).items() if k != "GPU"}
    return {"CPU": 1.0, **({"GPU": 1.0} if use_gpu else {}), **pool}


def stage_run_name(run_dir: Path, stage: str, resume: bool) -> str:
    """This attempt's Ray Train run name (see module docstring); recorded in RUN/stages/<stage>/run.json."""
    record = Path(run_dir) / "stages" / stage / "run.json"
    if resume and record.exists():
        info = json.loads(record.read_text())
        if info.get("status") != "finished":
            return info["name"]
    name = f"{Path(run_dir).name}-{stage}-{time.strftime('%Y%m%d-%H%M%S')}-{time.time_ns() % 100000:05d}"
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps({"name": name, "status": "running"}) + "\n")
    return name


def _mark(run_dir: Path, stage: str, name: str, status: str) -> None:
    record = Path(run_dir) / "stages" / stage / "run.json"
    record.write_text(json.dumps({"name": name, "status": status}) + "\n")


def ensure_ray(num_cpus: int | None = None) -> str:
    """Connect to the cluster we run in (RAY_ADDRESS, which `ray job submit` sets), else start a local
    Ray with more logical CPUs than cores (two 1-CPU workers would otherwise starve Data/Serve actors).

    A cluster merely running on the machine is not joined without RAY_ADDRESS: on a shared machine it
    may be someone else's.
    """
    import os

    import ray

    if not ray.is_initialized():
        env = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "OMP_WAIT_POLICY": "PASSIVE"}
        if os.environ.get("RAY_ADDRESS"):
            ray.init(address="auto", log_to_driver=True)
        else:
            cores = os.cpu_count() or 1
            ray.init(num_cpus=num_cpus or max(8, 4 * cores), include_dashboard=False,
                     runtime_env={"env_vars": env})
    return ray.get_runtime_context().gcs_address


def run_stage(job: StageJob, dataset, *, workers: Workers = Workers(2, 2), max_failures: int = 1,
              resume: bool = False, run_name: str | None = None, ledger=None, placement: str = "auto",
              resize_interval_s: float = RESIZE_INTERVAL_S):
    """Train one stage on `dataset` (a Ray Dataset of annotated rows); returns Ray's Result.

    The stage's HF checkpoint is at `stage_output_dir(run_dir, stage)` when this returns.
    Elastic (`workers.min < workers.max`): Ray Train starts once MIN workers fit, asks for MAX, and
    every `resize_interval_s` while training checks whether more fit; if so it restarts the worker
    group at the larger size from the last checkpoint (a weights-only resume, see checkpoint.py).
    """
    import ray
    from ray.train import (
        CheckpointConfig,
        DataConfig,
        FailureConfig,
        RunConfig,
        ScalingConfig,
    )
    from ray.train.torch import TorchConfig, TorchTrainer

    from student.training.worker import train_loop

    run_dir = Path(job.run_dir).resolve()
    name = run_name or stage_run_name(run_dir, job.stage, resume)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"job": job, "ledger": ledger},
        torch_config=TorchConfig(backend="nccl" if job.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=workers.scaling(), use_gpu=job.use_gpu,
                                     resources_per_worker=worker_resources(job.use_gpu, ray.cluster_resources(),
                                                                           placement),
                                     elastic_resize_monitor_interval_s=resize_interval_s),
        run_config=RunConfig(name=name, storage_path=str(run_dir / "ray"),
                             failure_config=FailureConfig(max_failures=max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
        datasets={"train": dataset},
        dataset_config=DataConfig(datasets_to_split=["train"]),
    )
    result = trainer.fit()
    _mark(run_dir, job.stage, name, "finished")
    return result
