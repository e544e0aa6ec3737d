"""``serve deploy serve_config.yaml`` to a running Ray, as on a cluster, and ``serve status`` when a model cannot load.

The shipped config with two applications: a model path that does not exist and a checkpoint whose safetensors
file is cut short. Each ends DEPLOY_FAILED after a bounded number of constructor attempts, with the loader's
reason in ``serve status`` and in the Serve logs, and no replica left restarting.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ray
import yaml
from ray import serve
from test_serve import TINY, free_port, wait_until

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
MISSING = "/nonexistent/VTP-Small-f16d64"
FAIL_WITHIN_S = 180


def _cli(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


def _corrupt_checkpoint(directory: Path) -> Path:
    """The tiny checkpoint with its safetensors file cut in half."""
    directory.mkdir()
    shutil.copy(Path(TINY) / "config.json", directory / "config.json")
    weights = (Path(TINY) / "model.safetensors").read_bytes()
    (directory / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    return directory


@pytest.fixture(scope="module")
def deployed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, float, Path]]:
    """(dashboard address, deploy time, session log dir) of a Ray that `serve deploy` was run on."""
    assert not ray.is_initialized(), "another test module left Ray running"
    tmp = tmp_path_factory.mktemp("serve_deploy")
    dashboard_port, http_port = free_port(), free_port()
    ray.init(num_cpus=4, include_dashboard=True, dashboard_port=dashboard_port, logging_level=logging.WARNING)
    logs = Path("/tmp/ray/session_latest").resolve() / "logs"  # this Ray's session, just started

    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    config["http_options"]["port"] = http_port
    shipped = config["applications"].pop()
    broken = {"missing": MISSING, "corrupt": str(_corrupt_checkpoint(tmp / "corrupt"))}
    for name, model in broken.items():
        app = {**shipped, "name": name, "route_prefix": f"/{name}", "args": {**shipped["args"], "model": model}}
        config["applications"].append(app)
    path = tmp / "serve_config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))

    address = f"http://127.0.0.1:{dashboard_port}"
    deployed_at = time.monotonic()
    subprocess.run([_cli("serve"), "deploy", str(path), "-a", address], cwd=tmp, check=True, capture_output=True)
    try:
        yield address, deployed_at, logs
    finally:
        serve.shutdown()
        ray.shutdown()


def serve_status(address: str) -> dict[str, Any]:
    """What `serve status` prints, parsed."""
    result = subprocess.run([_cli("serve"), "status", "-a", address], capture_output=True, text=True, check=True)
    return yaml.safe_load(result.stdout)


@pytest.mark.parametrize(
    ("app", "reason"),
    [
        ("missing", f"model path '{MISSING}' does not exist"),
        ("corrupt", "CheckpointError"),
    ],
)
def test_a_model_that_cannot_load_fails_the_deployment_with_its_reason(deployed, app: str, reason: str) -> None:
    address, deployed_at, logs = deployed

    def failed() -> dict[str, Any] | None:
        status = serve_status(address)["applications"][app]
        return status if status["status"] == "DEPLOY_FAILED" else None

    status = wait_until(failed, FAIL_WITHIN_S, f"{app} to end DEPLOY_FAILED", interval_s=2)
    assert time.monotonic() - deployed_at < FAIL_WITHIN_S
    model = status["deployments"]["VTPModel"]
    assert model["status"] == "DEPLOY_FAILED"
    assert reason in model["message"], model["message"]
    assert "VTPModel" in status["message"]

    time.sleep(3)  # and it stays down: no replica is starting again behind the failed status
    again = serve_status(address)["applications"][app]["deployments"]["VTPModel"]
    assert again["status"] == "DEPLOY_FAILED"
    assert not {state: n for state, n in again.get("replica_states", {}).items() if state != "STOPPING" and n}

    logged = "".join(p.read_text(errors="replace") for p in (logs / "serve").glob("*.log"))
    assert reason in logged
