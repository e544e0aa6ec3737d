"""``serve deploy serve_config.yaml`` to a running Ray, as on a cluster: ``serve status`` when a model cannot load,
and batching changed live.

The shipped config (the tiny model) beside the last release's. A second ``serve deploy`` with a new ``user_config``
changes the good one's batching without reloading its weights. The soak tier adds two applications whose model
cannot load (a path that does not exist, a checkpoint whose safetensors file is cut short): each ends DEPLOY_FAILED
after a bounded number of constructor attempts, with the loader's reason in ``serve status`` and in the Serve logs,
and no replica left restarting.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import ray
import yaml
from helpers import FIXTURES, ROOT, SIZE, TINY, free_port, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.own_ray]

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
def deployed(own_ray: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """What `serve deploy` was run with: dashboard address, deploy time, session log dir, config, HTTP URL."""
    tmp = tmp_path_factory.mktemp("serve_deploy")
    dashboard_port, http_port = free_port(), free_port()
    ray.init(
        address="local",
        num_cpus=4,
        include_dashboard=True,
        dashboard_port=dashboard_port,
        logging_level=logging.WARNING,
    )
    logs = Path(ray._private.worker._global_node.get_logs_dir_path())  # this Ray session's, wherever RAY_TMPDIR puts it

    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    config["http_options"]["port"] = http_port
    good = config["applications"][0]
    good["args"].update(model=TINY, image_size=SIZE)
    broken = {"missing": MISSING, "corrupt": str(_corrupt_checkpoint(tmp / "corrupt"))}
    broken_apps = [
        {**good, "name": name, "route_prefix": f"/{name}", "args": {**good["args"], "model": model}}
        for name, model in broken.items()
    ]
    # The application of the last release's serve_config.yaml (flat args), as it was: only its name, route and
    # model differ, to run beside the others.
    (old,) = yaml.safe_load((FIXTURES / "releases" / "serve_config-0.1.0.yaml").read_text())["applications"]
    old.update(name="old", route_prefix="/old")
    old["args"].update(model=TINY, image_size=SIZE)
    config["applications"].append(old)
    path = tmp / "serve_config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))

    address = f"http://127.0.0.1:{dashboard_port}"
    subprocess.run([_cli("serve"), "deploy", str(path), "-a", address], cwd=tmp, check=True, capture_output=True)
    yield {"address": address, "logs": logs, "config": config, "tmp": tmp, "broken": broken_apps}
    # own_ray's successor (or the session end) stops this Ray


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
@pytest.mark.soak  # six replica starts that fail, on 2 cores; tests/test_serve_ops.py checks the reasons in /readyz
def test_a_model_that_cannot_load_fails_the_deployment_with_its_reason(deployed, app: str, reason: str) -> None:
    address, logs = deployed["address"], deployed["logs"]
    if "broken_at" not in deployed:  # the config with the two broken applications beside the others, once
        config = {**deployed["config"], "applications": [*deployed["config"]["applications"], *deployed["broken"]]}
        path = deployed["tmp"] / "serve_config_broken.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        deployed["broken_at"] = time.monotonic()
        subprocess.run([_cli("serve"), "deploy", str(path), "-a", address], check=True, capture_output=True)
    deployed_at = deployed["broken_at"]

    def failed() -> dict[str, Any] | None:
        status = serve_status(address)["applications"][app]
        return status if status["status"] == "DEPLOY_FAILED" else None

    status = wait_until(failed, FAIL_WITHIN_S, f"{app} to end DEPLOY_FAILED", interval_s=2)
    assert time.monotonic() - deployed_at < FAIL_WITHIN_S
    model = status["deployments"]["VTPReplica"]
    assert model["status"] == "DEPLOY_FAILED"
    assert reason in model["message"], model["message"]
    assert "VTPReplica" in status["message"]

    time.sleep(3)  # and it stays down: no replica is starting again behind the failed status
    again = serve_status(address)["applications"][app]["deployments"]["VTPReplica"]
    assert again["status"] == "DEPLOY_FAILED"
    assert not {state: n for state, n in again.get("replica_states", {}).items() if state != "STOPPING" and n}

    logged = "".join(p.read_text(errors="replace") for p in (logs / "serve").glob("*.log"))
    assert reason in logged


def test_the_last_release_config_runs_unchanged(deployed) -> None:
    url = f"http://127.0.0.1:{deployed['config']['http_options']['port']}"
    with httpx.Client(base_url=url, timeout=30) as client:
        info = wait_until(lambda: _answered(client, "/old/v1/model"), 120, "the old config's app to answer")
        assert info["limits"]["max_body_bytes"] == 16777216 and info["limits"]["max_pixels"] == 40_000_000
        assert info["batching"] == {
            "max_batch_size": 8,
            "batch_wait_timeout_s": 0.0,
            "batch_min_share": 0.05,
            "batch_work_size": None,
            "batch_work_max_ms": 250.0,
            "batch_idle_work_size": None,
        }
        answer = client.post("/old/v1/reconstruct", content=_png(), headers={"content-type": "image/png"})
        assert answer.status_code == 200, answer.text


def test_a_new_user_config_changes_batching_without_reloading_weights(deployed) -> None:
    config, address = deployed["config"], deployed["address"]
    url = f"http://127.0.0.1:{config['http_options']['port']}"
    with httpx.Client(base_url=url, timeout=30) as client:
        before = wait_until(lambda: _answered(client, "/v1/model"), 120, "the good app to answer")
        assert before["batching"] == {
            "max_batch_size": 8,
            "batch_wait_timeout_s": 0.0,
            "batch_min_share": 0.05,
            "batch_work_size": None,
            "batch_work_max_ms": 250.0,
            "batch_idle_work_size": None,
        }

        (replica,) = [d for d in config["applications"][0]["deployments"] if d["name"] == "VTPReplica"]
        replica["user_config"] = {"max_batch_size": 3, "batch_wait_timeout_s": 0.002, "batch_work_size": 5}
        path = deployed["tmp"] / "serve_config_2.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        subprocess.run([_cli("serve"), "deploy", str(path), "-a", address], check=True, capture_output=True)

        def reconfigured() -> dict[str, Any] | None:
            info = client.get("/v1/model").json()
            return info if info["batching"]["max_batch_size"] == 3 else None

        after = wait_until(reconfigured, 60, "the new batching to apply")
    assert after["batching"] == {
        "max_batch_size": 3,
        "batch_wait_timeout_s": 0.002,
        "batch_min_share": 0.05,
        "batch_work_size": 5,
        "batch_work_max_ms": 250.0,
        "batch_idle_work_size": None,
    }
    # The same replica, loaded once: reconfigure ran on it, the weights were not loaded again.
    assert (after["replica"]["id"], after["replica"]["loaded_at"]) == (
        before["replica"]["id"],
        before["replica"]["loaded_at"],
    )


def test_a_new_ingress_user_config_changes_limits_without_touching_the_models(deployed) -> None:
    """The ingress's limits are its user_config: a `serve deploy` changing them applies to every route at once, and
    neither the model replica nor the ingress replica restarts."""
    config, address = deployed["config"], deployed["address"]
    url = f"http://127.0.0.1:{config['http_options']['port']}"
    with httpx.Client(base_url=url, timeout=30) as client:
        before = wait_until(lambda: _answered(client, "/v1/model"), 120, "the good app to answer")
        ingress_before = _actor_ids("VTPIngress")
        (ingress,) = [d for d in config["applications"][0]["deployments"] if d["name"] == "VTPIngress"]
        ingress["user_config"]["limits"]["max_body_bytes"] = 4096
        path = deployed["tmp"] / "serve_config_limits.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        subprocess.run([_cli("serve"), "deploy", str(path), "-a", address], check=True, capture_output=True)

        def applied() -> dict[str, Any] | None:
            info = client.get("/v1/model").json()
            return info if info["limits"]["max_body_bytes"] == 4096 else None

        after = wait_until(applied, 60, "the new limit to apply")
        refused = client.post("/v1/reconstruct", content=b"x" * 5000, headers={"content-type": "image/png"})
        assert refused.status_code == 413 and "4096" in refused.json()["error"]
        oip = client.post("/v2/models/vtp.encode/infer", content=b"{" + b" " * 5000 + b"}")
        assert oip.status_code == 413
    assert (after["replica"]["id"], after["replica"]["loaded_at"]) == (
        before["replica"]["id"],
        before["replica"]["loaded_at"],
    )
    assert _actor_ids("VTPIngress") == ingress_before  # reconfigured in place
    ingress["user_config"]["limits"]["max_body_bytes"] = 16 * 2**20  # as shipped, for the next push


def test_a_key_rotates_on_the_running_ingress(deployed) -> None:
    """Named keys are the ingress's user_config (names and SHA-256 digests): `serve deploy` with a new key set
    applies to the running ingress replica (same actor), so a key rotates with the old and the new one valid side
    by side, then the old one revoked."""
    config, address = deployed["config"], deployed["address"]
    url = f"http://127.0.0.1:{config['http_options']['port']}"
    (ingress,) = [d for d in config["applications"][0]["deployments"] if d["name"] == "VTPIngress"]
    ingress_before = _actor_ids("VTPIngress")
    old, new = "old-key-3f9a1c", "new-key-7b2e44"

    def push(*keys: str) -> None:
        ingress["user_config"]["keys"] = {"named": {"team-a": {"sha256": [_sha256(k) for k in keys]}}} if keys else {}
        path = deployed["tmp"] / f"serve_config_keys_{len(keys)}_{keys[-1] if keys else 'none'}.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        subprocess.run([_cli("serve"), "deploy", str(path), "-a", address], check=True, capture_output=True)

    def statuses(client: httpx.Client) -> dict[str, int]:
        sent = {"old": {"authorization": f"Bearer {old}"}, "new": {"authorization": f"Bearer {new}"}, "none": {}}
        return {name: client.get("/v1/model", headers=headers).status_code for name, headers in sent.items()}

    with httpx.Client(base_url=url, timeout=30) as client:
        wait_until(lambda: client.get("/v1/model").status_code == 200, 120, "the good app to answer")
        for keys, expected in [
            ((old,), {"old": 200, "new": 401, "none": 401}),
            ((old, new), {"old": 200, "new": 200, "none": 401}),  # the overlap: clients move over
            ((new,), {"old": 401, "new": 200, "none": 401}),  # the old key revoked
        ]:
            push(*keys)
            wait_until(lambda expected=expected: statuses(client) == expected, 60, f"keys {len(keys)} to apply")
        caller = client.get("/v1/model", headers={"authorization": f"Bearer {new}"}).json()["caller"]
        assert caller["key"] == "team-a" and caller["model"] == {"rate": 5.0, "burst": 16}
        push()  # no keys again, for the next push
        wait_until(lambda: client.get("/v1/model").status_code == 200, 60, "the keys to go")
    assert _actor_ids("VTPIngress") == ingress_before  # reconfigured in place, never restarted
    logged = "".join(p.read_text(errors="replace") for p in (deployed["logs"] / "serve").glob("replica_vtp_*.log"))
    assert "caller team-a client 127.0.0.1 GET /v1/model 200" in logged and old not in logged and new not in logged


def _sha256(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _actor_ids(deployment: str) -> set[str]:
    """The live actors of the good app's ``deployment`` (Serve names them SERVE_REPLICA::<app>#<deployment>#<id>)."""
    prefix = f"SERVE_REPLICA::vtp#{deployment}#"
    return {
        actor_id
        for actor_id, actor in ray._private.state.state.actor_table(None).items()
        if actor["Name"].startswith(prefix) and actor["State"] == "ALIVE"
    }


def test_a_push_no_node_can_place_leaves_the_old_replica_serving(deployed) -> None:
    """A `serve deploy` whose model replicas ask for NPUs on a cluster without any: the running replica keeps
    serving (Serve starts the replacement first: max_surge_percent), readiness stays 200 and says what is wrong."""
    config, address = deployed["config"], deployed["address"]
    url = f"http://127.0.0.1:{config['http_options']['port']}"
    with httpx.Client(base_url=url, timeout=30) as client:
        before = wait_until(lambda: _answered(client, "/v1/model"), 120, "the good app to answer")
        (replica,) = [d for d in config["applications"][0]["deployments"] if d["name"] == "VTPReplica"]
        replica["ray_actor_options"] = {"resources": {"NPU": 1}}
        path = deployed["tmp"] / "serve_config_npu.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        subprocess.run([_cli("serve"), "deploy", str(path), "-a", address], check=True, capture_output=True)

        def reported() -> dict[str, Any] | None:
            response = client.get("/readyz")
            status = response.json()["models"]["vtp"]
            return {"code": response.status_code, **status} if status["unplaceable"] else None

        status = wait_until(reported, 30, "the unplaceable replacement to be reported", interval_s=0.5)
        assert status["code"] == 200 and status["ready"] is True and status["running_replicas"] == 1
        assert "cannot be placed" in status["unplaceable"] and "'NPU': 1.0" in status["unplaceable"]
        assert client.get("/v1/models").json()["models"]["vtp"]["unplaceable"] == status["unplaceable"]
        png = client.post("/v1/preprocess", content=_png(), headers={"content-type": "image/png"}).content
        answer = client.post("/v1/reconstruct", content=png, headers={"content-type": "image/png"})
        assert answer.status_code == 200
        assert client.get("/v1/model").json()["replica"]["id"] == before["replica"]["id"]


def _png() -> bytes:
    from helpers import png_bytes, random_image

    return png_bytes(random_image(SIZE, SIZE))


def _answered(client: httpx.Client, path: str) -> dict[str, Any] | None:
    """The route's JSON once its own app answers it: until the proxy knows a prefix, another app's 404 comes back."""
    response = client.get(path)
    return response.json() if response.status_code == 200 else None
