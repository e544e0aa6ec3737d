"""``examples/cluster/start_node.sh`` as an operator runs it, on loopback: a head that creates the cluster's token,
a worker that joins with the same token, ``serve deploy`` and ``serve status`` with it, and without it refused.

The cluster gets a temp dir of its own (so no other Ray on this machine sees or joins it) and is torn down by
killing the processes of that temp dir (never ``ray stop``, which would stop every Ray on the machine).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from helpers import ROOT, SIZE, TINY, free_port, wait_until

# The soak tier: a cluster of its own (a head and a worker started by the script), 35-55 s of CI's 15 minutes.
pytestmark = [pytest.mark.slow, pytest.mark.soak, pytest.mark.own_ray]

SCRIPT = ROOT / "examples" / "cluster" / "start_node.sh"


def _bin(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


def _kill_cluster(temp_dir: str, gcs_port: int) -> None:
    for pattern in (temp_dir, f":{gcs_port}"):
        subprocess.run(["pkill", "-9", "-f", pattern], check=False)


@pytest.fixture(scope="module")
def cluster(own_ray: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("cluster")
    temp_dir = tempfile.mkdtemp(prefix="vr-", dir="/tmp")  # short: Ray's unix socket paths must fit 107 bytes
    gcs_port, dashboard_port = free_port(), free_port()
    base = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_ADDRESS"))}
    base["PATH"] = f"{Path(sys.executable).parent}:{base['PATH']}"
    head_home = tmp / "head-home"
    head_env = {
        **base,
        "HOME": str(head_home),
        "RAY_PORT": str(gcs_port),
        "DASHBOARD_PORT": str(dashboard_port),
        "RAY_START_ARGS": f"--node-ip-address 127.0.0.1 --temp-dir {temp_dir} --num-cpus 2 "
        f"--ray-client-server-port {free_port()} --dashboard-agent-listen-port {free_port()}",
    }
    try:
        head = subprocess.run(["bash", str(SCRIPT)], env=head_env, capture_output=True, text=True, timeout=180)
        assert head.returncode == 0, head.stdout[-3000:] + head.stderr[-3000:]
        token_file = head_home / ".ray" / "auth_token"
        assert "Cluster token" in head.stdout and token_file.is_file()
        token = token_file.read_text().strip()

        # The worker has another home: the token reaches it through RAY_AUTH_TOKEN, as on another machine.
        worker_env = {
            **base,
            "HOME": str(tmp / "worker-home"),
            "RAY_AUTH_TOKEN": token,
            "NPUS": "1",
            "RAY_START_ARGS": f"--node-ip-address 127.0.0.1 --num-cpus 1 --dashboard-agent-listen-port {free_port()}",
        }
        address = f"127.0.0.1:{gcs_port}"
        worker = subprocess.run(
            ["bash", str(SCRIPT), address], env=worker_env, capture_output=True, text=True, timeout=180
        )
        assert worker.returncode == 0, worker.stdout[-3000:] + worker.stderr[-3000:]
        status = [_bin("ray"), "status", "--address", address]

        def npu_joined() -> bool:  # the worker's resources reach the head's view within a few seconds
            seen = subprocess.run(status, env={**worker_env, "RAY_AUTH_MODE": "token"}, capture_output=True, text=True)
            return "1.0 NPU" in seen.stdout

        wait_until(npu_joined, 60, "the worker's NPU in `ray status`", interval_s=0.5)
        client_env = {**base, "HOME": str(tmp / "client-home"), "RAY_AUTH_TOKEN": token, "RAY_AUTH_MODE": "token"}
        yield {
            "dashboard": f"http://127.0.0.1:{dashboard_port}",
            "client_env": client_env,
            "base_env": base,
            "tmp": tmp,
        }
    finally:
        _kill_cluster(temp_dir, gcs_port)


def _serve(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([_bin("serve"), *args], env=env, capture_output=True, text=True, timeout=120)


def test_serve_deploy_and_status_with_the_token_and_refused_without(cluster: dict[str, Any]) -> None:
    http_port = free_port()
    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    config["http_options"] = {"host": "127.0.0.1", "port": http_port}
    config["proxy_location"] = "HeadOnly"  # two raylets share 127.0.0.1: one proxy
    app = config["applications"][0]
    app["args"].update(model=TINY, image_size=SIZE, placement="npu", device="cpu")  # the worker's NPU
    path = cluster["tmp"] / "serve_config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))

    env, dashboard = cluster["client_env"], cluster["dashboard"]
    deployed = _serve(["deploy", str(path), "-a", dashboard], env)
    assert deployed.returncode == 0, deployed.stderr[-3000:]

    def running() -> bool:
        status = yaml.safe_load(_serve(["status", "-a", dashboard], env).stdout)
        return status["applications"].get("vtp", {}).get("status") == "RUNNING"

    # the app's readiness first (a `serve status` per poll would cost a process start each time), then the CLI
    ready = f"http://127.0.0.1:{http_port}/readyz"
    wait_until(lambda: httpx.get(ready, timeout=30).status_code == 200, 180, "the app to be ready", interval_s=1)
    wait_until(running, 60, "the app to run on the token-protected cluster", interval_s=1)
    info = httpx.get(f"http://127.0.0.1:{http_port}/v1/model", timeout=30).json()
    assert info["replica"]["accelerator_ids"] == {"NPU": ["0"]}  # placed on the worker's declared NPU

    refused = _serve(["status", "-a", dashboard], cluster["base_env"] | {"HOME": str(cluster["tmp"] / "nobody")})
    assert refused.returncode != 0 and "token" in (refused.stdout + refused.stderr).lower()
