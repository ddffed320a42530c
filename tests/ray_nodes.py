"""Private Ray clusters for tests: a `ray start --head` node and extra nodes that join it, all on this
machine, each with its own ports and temp dir (other Ray clusters may run here with the default ports
taken), each started as our own process group and killed with it. Never anyone else's cluster.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

RAY = str(Path(sys.executable).parent / "ray")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_env() -> dict:
    """Environment for `ray` CLIs and drivers of a private cluster.

    Ray 2.60: the first local ray.init() writes ~/.ray/auth_token, after which `ray start --head`
    turns token auth on while the `ray job` CLI stays in mode 'disabled' and is refused; say "token"
    on every side explicitly."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "RAY_AUTH_MODE": "token"}
    env.pop("RAY_ADDRESS", None)
    return env


def _own_ports() -> list[str]:
    return [f"--{name}={free_port()}" for name in (
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port", "runtime-env-agent-port",
        "node-manager-port", "object-manager-port")]


def _stop(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            pass


@contextmanager
def ray_head(*, num_cpus: int, resources: dict | None = None, env: dict | None = None):
    """A `ray start --head --block` node with its dashboard (job server, state API). Yields
    {"address": GCS address, "dashboard": URL, "env": env} once its job server answers.

    A head that exits while starting is started once more on fresh ports: the ports come from
    free_port(), which another process can take between our probe and Ray's bind. (A head exited so once
    in a full-suite run, cause unseen then; its output is now part of the error.)"""
    env = env or ray_env()
    for attempt in (1, 2):
        port, dash = free_port(), free_port()
        args = ["--head", f"--port={port}", f"--dashboard-port={dash}", "--dashboard-host=127.0.0.1",
                "--include-dashboard=true", f"--ray-client-server-port={free_port()}"]
        info = {"address": f"127.0.0.1:{port}", "dashboard": f"http://127.0.0.1:{dash}", "env": env}
        with _node(args, num_cpus, resources, env) as proc:
            try:
                _wait(proc, lambda: subprocess.run([RAY, "job", "list", "--address", info["dashboard"]], env=env,
                                                   capture_output=True).returncode == 0)
            except NodeExited as e:
                if attempt == 2:
                    raise
                print(f"ray_head: retrying on fresh ports after: {e}", file=sys.stderr)
                continue
            yield info
            return


@contextmanager
def ray_worker_node(head: dict, *, num_cpus: int, resources: dict | None = None):
    """A `ray start --address HEAD --block` node joining `head` (what `ray_head` yields); yields the
    time.time() at which the head lists one more node alive."""
    before = alive_nodes(head)
    with _node([f"--address={head['address']}"], num_cpus, resources, head["env"]) as proc:
        _wait(proc, lambda: len(alive_nodes(head)) > len(before))
        yield time.time()


def alive_nodes(head: dict) -> list[dict]:
    """The cluster's alive nodes (`ray list nodes` through the head's state API; no driver of ours)."""
    out = subprocess.run([RAY, "list", "nodes", "--address", head["dashboard"], "--format", "json",
                          "--filter", "state=ALIVE"], env=head["env"], capture_output=True, text=True, timeout=60)
    try:
        return json.loads(out.stdout) if out.returncode == 0 else []
    except ValueError:
        return []


@contextmanager
def _node(args: list[str], num_cpus: int, resources: dict | None, env: dict):
    temp = tempfile.mkdtemp(prefix="rn-", dir="/tmp")  # short: Ray's socket paths have a length limit
    cmd = [RAY, "start", "--block", f"--num-cpus={num_cpus}", f"--temp-dir={temp}", "--disable-usage-stats",
           "--object-store-memory=200000000", *_own_ports(), *args]
    if resources:
        cmd.append(f"--resources={json.dumps(resources)}")
    log = open(os.path.join(temp, "ray-start.log"), "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    proc.log_path = log.name  # read by _wait when the node dies while starting
    try:
        yield proc
    finally:
        _stop(proc)
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


class NodeExited(AssertionError):
    """A `ray start --block` process ended before its node was ready."""


def _wait(proc: subprocess.Popen, ready, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while not ready():
        if proc.poll() is not None:
            with open(proc.log_path) as f:
                tail = f.read()[-3000:]
            raise NodeExited(f"ray start exited with {proc.returncode}; its output ends:\n{tail}")
        assert time.time() < deadline, f"the Ray node did not come up in {timeout:.0f} s"
        time.sleep(1)
