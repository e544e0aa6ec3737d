"""``serve run serve_config.yaml`` as users run it: a subprocess with its own embedded Ray.

A temporary copy of the shipped config moves the port to a free one, enables gRPC with the config's own commented
``grpc_options`` block, and makes the model deployment tiny (2 requests in flight, 1 queued) so that a burst of
requests gets Serve's back-pressure answer, 503. Serve's direct ingress is on, as docs/performance.md's recipe has it,
so the ingress replica's own HTTP port answers too, next to the proxy's.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from helpers import ROOT, TINY, free_port, png_array, png_bytes, post_concurrently, random_image, wait_until

# The soak tier: an embedded Ray of its own (tests/test_cluster_scripts.py deploys the shipped config in CI).
pytestmark = [pytest.mark.slow, pytest.mark.soak]
STARTUP_TIMEOUT_S = 150
GRPC_PORT = free_port()
DIRECT_PORT = free_port()  # the first of the direct-ingress port range: the one ingress replica's


def _commented_grpc_options(config_text: str) -> dict:
    """The config's commented-out ``grpc_options`` block, uncommented, as docs/serving.md tells operators to do."""
    lines = config_text.splitlines()
    start = lines.index("# grpc_options:")
    block = [lines[start], *itertools.takewhile(lambda line: line.startswith("#   "), lines[start + 1 :])]
    block = [line[2:] for line in block]
    return yaml.safe_load("\n".join(block))["grpc_options"]


def _serve_executable() -> str:
    return str(Path(sys.executable).with_name("serve"))


@pytest.fixture(scope="module")
def base_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("serve_run")
    text = (ROOT / "serve_config.yaml").read_text()
    config = yaml.safe_load(text)
    port = free_port()
    config["http_options"]["port"] = port
    config["grpc_options"] = {**_commented_grpc_options(text), "port": GRPC_PORT}
    app = config["applications"][0]
    model = next(d for d in app["deployments"] if d["name"] == "VTPReplica")
    model.update(max_ongoing_requests=2, max_queued_requests=1)
    model["user_config"] = {"max_batch_size": 4, "batch_wait_timeout_s": 0.5}
    config_path = tmp / "serve_config.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))

    # RAY_ADDRESS=local: always a fresh embedded Ray, never a cluster some other process started here.
    env = {**os.environ, "VTP_MODEL": TINY, "RAY_ADDRESS": "local", "PYTHONPATH": str(ROOT)}
    env.update(
        RAY_SERVE_ENABLE_DIRECT_INGRESS="1",
        RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT=str(DIRECT_PORT),
        RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT=str(DIRECT_PORT + 100),
        RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S="1",  # a quick stop (the default waits 30 s for the LB)
    )
    log_path = tmp / "serve_run.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [_serve_executable(), "run", str(config_path)],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: the Ray processes it starts go down with it
        )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(url, process, log_path)
        wait_until(lambda: "VTPReplica ready: vtp-tiny on cpu fp32" in log_path.read_text(), 30, "the ready line")
        yield url
    finally:
        _stop(process)


def _wait_ready(url: str, process: subprocess.Popen[bytes], log_path: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"serve run exited with {process.returncode}:\n{log_path.read_text()[-4000:]}")
        try:
            if httpx.get(f"{url}/v1/model", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    pytest.fail(f"serve run did not answer within {STARTUP_TIMEOUT_S}s:\n{log_path.read_text()[-4000:]}")


def _stop(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGINT)  # what Ctrl-C does: serve shuts down, the embedded Ray with it
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=30)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)  # whatever of its group is left
    process.wait(timeout=10)


def test_serve_run_starts_and_answers(base_url: str) -> None:
    assert httpx.get(f"{base_url}/healthz").json() == {"status": "ok"}
    info = httpx.get(f"{base_url}/v1/model").json()
    assert info["model_spec"] == TINY  # VTP_MODEL overrides the config's model
    assert info["device"] == "cpu"  # placement: auto on a machine without NPUs or GPUs
    response = httpx.post(
        f"{base_url}/v1/reconstruct", content=png_bytes(random_image()), headers={"content-type": "image/png"}
    )
    assert response.status_code == 200, response.text
    assert png_array(response.content).shape == (256, 256, 3)  # the config's image_size


def test_over_capacity_is_503_not_an_unbounded_queue(base_url: str) -> None:
    png = png_bytes(random_image(64, 64))
    requests = [{"url": "/v1/embed", "content": png, "headers": {"content-type": "image/png"}}] * 12
    responses = post_concurrently(base_url, requests)
    statuses = sorted(r.status_code for r in responses)
    assert 200 in statuses and 503 in statuses and set(statuses) == {200, 503}, statuses
    refused = next(r for r in responses if r.status_code == 503)
    assert "capacity" in refused.json()["error"] and refused.headers["retry-after"] == "1"
    # Capacity frees up again once the burst is through.
    assert httpx.post(f"{base_url}/v1/embed", content=png, headers={"content-type": "image/png"}).status_code == 200


def test_grpc_as_the_config_enables_it(base_url: str) -> None:
    """One application: gRPC clients need no ``application`` metadata. tritonclient.grpc runs in a process of its own
    (this one may have kserve, which registers the same protobuf messages)."""
    script = f"""
import numpy as np
import tritonclient.grpc as g

client = g.InferenceServerClient("127.0.0.1:{GRPC_PORT}")
print(client.is_server_ready(), client.is_model_ready("vtp.encode"))
pixels = g.InferInput("IMAGE", [2, 32, 32, 3], "UINT8")
pixels.set_data_from_numpy(np.zeros((2, 32, 32, 3), np.uint8))
print(client.infer("vtp.embed", [pixels]).as_numpy("CLIP_EMBEDDING").shape)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split("\n")[:2] == ["True True", "(2, 64)"]


def test_direct_ingress_answers_like_the_proxy(base_url: str) -> None:
    """The ingress replica's own port: the same app (readiness, the model, Server-Timing), no proxy process."""
    direct = f"http://127.0.0.1:{DIRECT_PORT}"
    wait_until(lambda: httpx.get(f"{direct}/readyz", timeout=5).status_code == 200, 60, "the direct port to answer")
    image = png_bytes(random_image(seed=7))
    answers = [
        httpx.post(f"{url}/v1/reconstruct", content=image, headers={"content-type": "image/png"}, timeout=60)
        for url in (base_url, direct)
    ]
    assert [a.status_code for a in answers] == [200, 200], answers[1].text
    proxied, direct_answer = (png_array(a.content).astype(int) for a in answers)
    assert direct_answer.shape == (256, 256, 3) and abs(proxied - direct_answer).max() <= 1  # uint8 rounding
    stages = [entry.split(";")[0] for entry in answers[1].headers["server-timing"].split(", ")]
    assert stages == ["read", "preprocess", "hop", "queue", "model", "output"]


def test_the_direct_port_keeps_each_clients_budget_by_its_own_address(base_url: str) -> None:
    """Past the proxy the app's rate limits still hold, and per client: the direct port sees each peer's own address
    (the config's cheap budget: 10 a second, burst 20)."""
    direct = f"http://127.0.0.1:{DIRECT_PORT}"
    wait_until(lambda: httpx.get(f"{direct}/healthz", timeout=5).status_code == 200, 60, "the direct port to answer")
    clients = {
        a: httpx.Client(transport=httpx.HTTPTransport(local_address=a), timeout=30) for a in ("127.0.5.1", "127.0.5.2")
    }
    with clients["127.0.5.1"] as greedy, clients["127.0.5.2"] as other:
        answers = []
        while len(answers) < 200 and (not answers or answers[-1].status_code == 200):
            answers.append(greedy.get(f"{direct}/healthz"))
        refused = answers[-1]
        assert refused.status_code == 429 and len(answers) > 20, [a.status_code for a in answers]
        assert int(refused.headers["retry-after"]) >= 1 and "rate limit" in refused.json()["error"]
        assert other.get(f"{direct}/healthz").status_code == 200  # another address: its own budget
