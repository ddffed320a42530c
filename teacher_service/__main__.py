"""`python -m teacher_service deploy | status | shutdown`: run the shared teacher on a Ray cluster.

The cluster is `--address` / RAY_ADDRESS when given, else a running local cluster (`ray start`),
else a new standalone one started with `ray start --head`. Never a driver-local `ray.init()`: that
cluster would die with this process, and the teacher app with it. Serve apps are owned by Serve's
controller (a detached actor), so a deployed teacher keeps serving after `deploy` exits, until
`shutdown` or until the cluster stops (`ray stop`).
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import click

from teacher_service.app import DEFAULT_APP_NAME

LOCAL_RAY_HINT = "a local Ray cluster was started for the teacher; stop it with `ray stop`"


def _connect(address: str | None, *, start: bool) -> bool:
    """Connect this process to the cluster; returns False when there is none and `start` is False."""
    import ray

    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=False)
        return True
    try:
        ray.init(address="auto", log_to_driver=False)
        return True
    except ConnectionError:
        if not start:
            return False
    ray_bin = shutil.which("ray", path=os.path.dirname(sys.executable)) or shutil.which("ray")
    if ray_bin is None:
        raise click.ClickException("no Ray cluster to connect to and no `ray` executable to start one")
    subprocess.run([ray_bin, "start", "--head", "--include-dashboard=false", "--disable-usage-stats"], check=True,
                   stdout=subprocess.DEVNULL)
    click.echo(LOCAL_RAY_HINT, err=True)
    ray.init(address="auto", log_to_driver=False)
    return True


def _autoscale(value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    try:
        lo, hi = (int(x) for x in value.split(":"))
    except ValueError:
        raise click.BadParameter(f"expected MIN:MAX, e.g. 1:4, got {value!r}", param_hint="--autoscale") from None
    return lo, hi


@click.group()
def main() -> None:
    """The frozen teacher as a Ray Serve app that any number of student runs share."""


@main.command()
@click.option("--model", required=True, type=click.Path(exists=True, file_okay=False), help="Local HF checkpoint dir.")
@click.option("--name", default=DEFAULT_APP_NAME, show_default=True, help="Serve app name clients look up.")
@click.option("--backend", default="hf", show_default=True, help="Backend: hf, vllm.")
@click.option("--replicas", type=int, default=None, help="Fixed number of replicas (default 1).")
@click.option("--autoscale", default=None, metavar="MIN:MAX", help="Autoscaling range instead of --replicas.")
@click.option("--num-gpus", type=float, default=0.0, show_default=True, help="GPUs per replica (fractions pack replicas).")
@click.option("--num-cpus", type=float, default=1.0, show_default=True, help="CPUs per replica.")
@click.option("--device", default="auto", show_default=True)
@click.option("--dtype", default="auto", show_default=True, help="auto: bf16 on a GPU that has it, else fp32.")
@click.option("--torch-threads", type=int, default=None, help="torch intra-op threads per replica.")
@click.option("--placement", type=click.Choice(["auto", "require", "off"]), default="auto", show_default=True,
              help="Custom resource teacher_gpu: use when the cluster has it / always / never.")
@click.option("--max-batch-tokens", type=int, default=16384, show_default=True, help="Padded tokens per forward.")
@click.option("--batch-wait-ms", type=float, default=10.0, show_default=True, help="How long a batch waits to fill.")
@click.option("--max-ongoing-requests", type=int, default=64, show_default=True, help="Per replica.")
@click.option("--max-queued-requests", type=int, default=256, show_default=True, help="Per caller; -1: unbounded.")
@click.option("--max-tokens", type=int, default=4096, show_default=True, help="Longest accepted request.")
@click.option("--http", is_flag=True, help="Also serve HTTP (npz bodies, bearer token from TEACHER_HTTP_TOKEN).")
@click.option("--http-host", default="127.0.0.1", show_default=True)
@click.option("--http-port", type=int, default=8000, show_default=True)
@click.option("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, then a local cluster).")
def deploy(model, name, backend, replicas, autoscale, num_gpus, num_cpus, device, dtype, torch_threads, placement,
           max_batch_tokens, batch_wait_ms, max_ongoing_requests, max_queued_requests, max_tokens, http, http_host,
           http_port, address) -> None:
    """Deploy (or update) the teacher app and wait until it is healthy; prints its info as JSON."""
    from teacher_service.app import ServiceConfig
    from teacher_service.app import deploy as deploy_app
    from teacher_service.http_ingress import TOKEN_ENV, HTTPConfig
    from teacher_service.protocol import Limits

    if replicas is not None and autoscale is not None:
        raise click.UsageError("give --replicas or --autoscale, not both")
    http_cfg = None
    if http:
        try:
            http_cfg = HTTPConfig(token=os.environ.get(TOKEN_ENV, ""), host=http_host, port=http_port)
        except ValueError as e:
            raise click.UsageError(str(e)) from None
    try:
        cfg = ServiceConfig(
            model=model, name=name, backend=backend, device=device, dtype=dtype, torch_threads=torch_threads,
            replicas=replicas or 1, autoscale=_autoscale(autoscale), num_cpus=num_cpus, num_gpus=num_gpus,
            placement=placement, max_batch_tokens=max_batch_tokens, batch_wait_timeout_s=batch_wait_ms / 1000,
            max_ongoing_requests=max_ongoing_requests, max_queued_requests=max_queued_requests,
            limits=Limits(max_tokens=max_tokens), http=http_cfg,
        )
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    _connect(address, start=True)
    try:
        handle = deploy_app(cfg)
    except RuntimeError as e:
        raise click.ClickException(str(e)) from None
    info = handle.get_info.remote().result(timeout_s=120)
    out = {"name": name, "info": info.to_dict()}
    if http_cfg is not None:
        out["http"] = f"http://{http_cfg.host}:{http_cfg.port}{http_cfg.route_prefix}"
    click.echo(json.dumps(out))


@main.command()
@click.option("--name", default=DEFAULT_APP_NAME, show_default=True)
@click.option("--address", default=None)
def status(name, address) -> None:
    """App and replica states, the teacher's identity and the server-side counters, as JSON."""
    from teacher_service.app import app_status
    from teacher_service.client import TeacherClient

    if not _connect(address, start=False):
        raise click.ClickException("no Ray cluster found (set RAY_ADDRESS or --address)")
    st = app_status(name)
    if st is None:
        raise click.ClickException(f"no Serve app named {name!r} on this cluster")
    if st["status"] == "RUNNING":
        client = TeacherClient(name, timeout_s=30, retries=0)
        st["info"] = dataclasses.asdict(client.info())
        st["stats"] = client.server_stats()
    click.echo(json.dumps(st))


@main.command()
@click.option("--name", default=DEFAULT_APP_NAME, show_default=True)
@click.option("--address", default=None)
def shutdown(name, address) -> None:
    """Delete the teacher app (and its HTTP ingress). The Ray cluster itself keeps running."""
    from teacher_service.app import shutdown as shutdown_app

    if not _connect(address, start=False):
        raise click.ClickException("no Ray cluster found (set RAY_ADDRESS or --address)")
    gone = shutdown_app(name)
    if not gone:
        raise click.ClickException(f"no Serve app named {name!r} on this cluster")
    click.echo(json.dumps({"deleted": gone}))


if __name__ == "__main__":
    main()
