"""Per-client rate limits and named API keys: the bucket arithmetic, the key ring and the settings (fast, no Ray),
then the app on the shared Serve: 429 with Retry-After after the refusal pause over /v1, the OIP's REST and gRPC
(KServe's InferenceGRPCClient), separate model and cheap budgets, budgets per key name, key names (never keys)
in ``/v1/model`` and in the ingress's log. Key rotation on a running app is in ``test_serve_deploy.py``.

The app gives each test its own clients through ``x-forwarded-for`` (``client_address_header``), so that no test
spends another's budget; one test checks the peer address itself from its own loopback source address.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
from pathlib import Path

import grpc
import httpx
import pytest
from helpers import SIZE, TINY, png_bytes, random_image
from pydantic import ValidationError
from serving import ServeInstance, deploy

from deployments import AppSettings, compose_app
from deployments.api.admission import route_kind
from deployments.callers import DEFAULT_KEY_NAME, FILE_CHECK_S, Caller, KeyRing, client_address, grpc_client_address
from deployments.model.health import ModelStatus, _reason, readiness, summarize_error
from deployments.ratelimit import ClientTable, retry_after_s
from deployments.settings import IngressConfig


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


# ------------------------------------------------------------------------------------------ the token buckets


def test_a_bucket_admits_its_burst_then_its_rate() -> None:
    table = ClientTable(("model", "cheap"), max_clients=10)
    assert [table.take("a", "model", 2.0, 3, 100.0) for _ in range(3)] == [0.0, 0.0, 0.0]  # the burst
    assert table.take("a", "model", 2.0, 3, 100.0) == pytest.approx(0.5)  # empty: one token in 1 / rate
    assert table.take("a", "model", 2.0, 3, 100.25) == pytest.approx(0.25)  # half a token in, nothing taken
    assert table.take("a", "model", 2.0, 3, 100.5) == 0.0  # one token in 0.5 s
    assert table.wait_s("a", "model", 2.0, 3, 100.5) == pytest.approx(0.5)
    assert table.take("a", "model", 2.0, 3, 200.0) == 0.0  # a long pause refills up to the burst, no more
    assert [table.take("a", "model", 2.0, 3, 200.0) for _ in range(3)][-1] == pytest.approx(0.5)


def test_kinds_and_clients_have_their_own_buckets_and_rate_0_is_no_limit() -> None:
    table = ClientTable(("model", "cheap"), max_clients=10)
    assert table.take("a", "model", 1.0, 1, 0.0) == 0.0
    assert table.take("a", "model", 1.0, 1, 0.0) > 0  # a's model budget is spent...
    assert table.take("a", "cheap", 1.0, 1, 0.0) == 0.0  # ...not its cheap one
    assert table.take("b", "model", 1.0, 1, 0.0) == 0.0  # ...nor b's
    assert all(table.take("c", "model", 0.0, 1, 0.0) == 0.0 for _ in range(100))
    assert table.wait_s("never-seen", "model", 1.0, 1, 0.0) == 0.0


def test_a_smaller_burst_applies_from_the_next_request() -> None:
    table = ClientTable(("model",), max_clients=10)
    table.take("a", "model", 1.0, 100, 0.0)  # 99 tokens left
    assert table.take("a", "model", 1.0, 2, 0.0) == 0.0  # clamped to 2, one taken
    assert table.take("a", "model", 1.0, 2, 0.0) == 0.0
    assert table.take("a", "model", 1.0, 2, 0.0) == pytest.approx(1.0)


def test_client_memory_is_bounded_and_least_recent_clients_go_first() -> None:
    table = ClientTable(("model", "cheap"), max_clients=100)
    table.take("regular", "model", 1.0, 1, 0.0)
    for i in range(10_000):  # a flood of distinct addresses
        table.take(f"10.{i // 256}.{i % 256}.1", "cheap", 1.0, 1, float(i))
        if i % 50 == 0:
            table.take("regular", "model", 1.0, 1, float(i))  # seen often: stays
    assert len(table) == 100
    assert table.wait_s("regular", "model", 1.0, 1, 9_999.0) == 0.0
    assert table.take("regular", "model", 1.0, 1, 9_999.0) == 0.0  # remembered: its bucket was spent at 9950...
    assert table.take("regular", "model", 1.0, 1, 9_999.0) > 0  # ...refilled, spent again
    table.max_clients = 10  # a smaller cap (reconfigure) applies from the next new client
    table.take("new", "cheap", 1.0, 1, 10_000.0)
    assert len(table) == 10


def test_pending_refusals_are_capped_per_client() -> None:
    table = ClientTable(("model",), max_clients=10)
    assert [table.hold("a", 2) for _ in range(3)] == [True, True, False]
    assert table.hold("b", 2) and table.pending("a") == 2
    table.release("a")
    assert table.pending("a") == 1 and table.hold("a", 2)
    table.release("nobody")  # a client forgotten meanwhile: nothing to release
    assert [retry_after_s(w) for w in (0.0, 0.2, 1.0, 1.01, 7.5)] == [1, 1, 1, 2, 8]


# ------------------------------------------------------------------------------------------ keys and callers


def _ring(tmp_path: Path | None = None, api_key: str | None = None, **keys: object) -> KeyRing:
    settings = AppSettings(model=TINY, api_key=api_key)
    return KeyRing(settings, IngressConfig.model_validate({"keys": keys}))


def test_named_keys_by_digest_with_two_valid_while_rotating() -> None:
    ring = _ring(named={"team-a": {"sha256": [sha("old-key"), sha("new-key")]}, "ci": {"sha256": sha("ci-key")}})
    assert ring.required and ring.names == ["ci", "team-a"]
    assert ring.identify("Bearer old-key") == ring.identify("bearer new-key ") == "team-a"
    assert ring.identify("Bearer ci-key") == "ci"
    for wrong in (None, "", "Bearer", "Bearer ", "Basic old-key", "Bearer old-key2", f"Bearer {sha('old-key')}"):
        assert ring.identify(wrong) is None, wrong
    assert not _ring().required and _ring().identify("Bearer anything") is None


def test_the_env_var_key_is_the_one_named_default() -> None:
    ring = _ring(api_key="s3cret", named={"team-a": {"sha256": sha("a")}})
    assert ring.identify("Bearer s3cret") == DEFAULT_KEY_NAME and ring.identify("Bearer a") == "team-a"
    with pytest.raises(ValueError, match="the name of api_key"):
        _ring(api_key="s3cret", named={"default": {"sha256": sha("a")}})


def test_a_key_is_never_accepted_where_its_digest_belongs() -> None:
    with pytest.raises(ValidationError, match="never the key"):
        IngressConfig.model_validate({"keys": {"named": {"team-a": {"sha256": "my-plain-key"}}}})
    with pytest.raises(ValidationError, match="key name"):
        IngressConfig.model_validate({"keys": {"named": {"team a!": {"sha256": sha("x")}}}})
    with pytest.raises(ValidationError):
        IngressConfig.model_validate({"rate_limits": {"model": {"rate": -1, "burst": 1}}})


def test_key_budgets_and_rate_limits_merge_key_by_key() -> None:
    config = IngressConfig().merged(
        {
            "rate_limits": {"model": {"rate": 20}},
            "keys": {"named": {"ci": {"sha256": sha("k"), "model": {"rate": 50, "burst": 100}}}},
        }
    )
    assert (config.rate_limits.model.rate, config.rate_limits.model.burst) == (20, 16)  # burst kept
    assert config.rate_limits.cheap == IngressConfig().rate_limits.cheap
    assert config.keys.named["ci"].model.burst == 100 and config.keys.named["ci"].cheap is None
    ring = KeyRing(AppSettings(model=TINY), config)
    assert ring.budget("ci", "model").rate == 50 and ring.budget("ci", "cheap") is None


def test_the_key_file_is_read_and_read_again_when_it_changes(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    path.write_text(json.dumps({"team-b": {"sha256": sha("b1")}}))
    now = [0.0]
    config = IngressConfig.model_validate({"keys": {"named": {"team-a": {"sha256": sha("a")}}, "file": str(path)}})
    ring = KeyRing(AppSettings(model=TINY), config, clock=lambda: now[0])
    assert ring.identify("Bearer b1") == "team-b" and ring.identify("Bearer a") == "team-a"

    path.write_text(f"team-b:\n  sha256: [{sha('b1')}, {sha('b2')}]\n")  # rotation: both valid
    os.utime(path, ns=(1, time.time_ns() + 10**9))
    assert ring.identify("Bearer b2") is None  # not looked at again yet
    now[0] += FILE_CHECK_S
    assert ring.identify("Bearer b2") == ring.identify("Bearer b1") == "team-b"

    path.write_text("team-b: [not, a, mapping")  # a broken file: the keys in force stay
    os.utime(path, ns=(1, time.time_ns() + 2 * 10**9))
    now[0] += FILE_CHECK_S
    assert ring.identify("Bearer b2") == "team-b"
    with pytest.raises(ValueError, match=r"keys\.file"):  # ...but a reconfigure with it fails, naming it
        KeyRing(AppSettings(model=TINY), config)
    path.write_text(json.dumps({"team-a": {"sha256": sha("x")}}))
    with pytest.raises(ValueError, match="team-a"):
        KeyRing(AppSettings(model=TINY), config)
    with pytest.raises(ValueError, match="cannot be read"):
        KeyRing(AppSettings(model=TINY), IngressConfig.model_validate({"keys": {"file": str(tmp_path / "none")}}))


def test_client_addresses_over_http_and_grpc() -> None:
    scope = {"headers": [(b"x-forwarded-for", b"1.2.3.4, 198.51.100.7")], "client": ("10.0.0.9", 5000)}
    assert client_address(scope, "X-Forwarded-For") == "198.51.100.7" and client_address(scope, None) == "10.0.0.9"
    assert grpc_client_address("ipv4:10.0.0.9:5000", {}, None) == "10.0.0.9"
    assert grpc_client_address("ipv6:%5B::1%5D:5000", {}, None) == "::1"
    assert grpc_client_address("ipv4:10.0.0.9:5000", {"x-forwarded-for": "1.2.3.4, 5.6.7.8"}, "x-forwarded-for") == (
        "5.6.7.8"
    )
    assert Caller("10.0.0.9").identity != Caller("10.0.0.9", "team-a").identity


# --------------------------------------------------------------------------------- errors say what, never how

# Serve's message for a model deployment whose constructor failed (Ray 2.60; the traceback cut short here).
SERVE_MESSAGE = (
    "The deployment failed to start 3 times in a row. This may be due to a problem with its constructor or initial "
    "health check failing. See controller logs for details. Error:\n\x1b[36mray::ServeReplica:b:VTPReplica."
    "initialize_and_get_metadata()\x1b[39m (pid=17919, ip=192.0.2.2, actor_id=af39bb2c)\n"
    '  File "/srv/venv/lib/python3.11/site-packages/ray/serve/_private/replica.py", line 1928, in initialize\n'
    "    raise RuntimeError(traceback.format_exc()) from None\n"
    "RuntimeError: Traceback (most recent call last):\n"
    '  File "/srv/app/vtp_ray/model/source.py", line 56, in read_spec\n'
    '    raise FileNotFoundError(f"model path {spec!r} does not exist.\\n{DOWNLOAD_HINT}")\n'
    "FileNotFoundError: model path '/models/VTP' does not exist.\n"
    "Download a published checkpoint into a local directory, e.g.\n"
    "  modelscope download --model MiniMax/VTP-Small-f16d64 --local_dir ./VTP-Small-f16d64\n"
    "and pass that directory; or try everything with seeded random weights: --model random:vtp-small"
)


def test_a_failed_model_is_one_line_without_the_traceback() -> None:
    assert summarize_error(SERVE_MESSAGE) == "FileNotFoundError: model path '/models/VTP' does not exist."
    corrupt = "RuntimeError: Traceback (most recent call last):\n  File x\nvtp_ray.model.source.CheckpointError: bad"
    assert summarize_error(corrupt) == "CheckpointError: bad"
    assert summarize_error("Deployment has 1 replica that failed its health check.") == (
        "Deployment has 1 replica that failed its health check."
    )
    assert len(summarize_error("x" * 5000)) == 300
    reason = _reason("vtp", "DEPLOY_FAILED", SERVE_MESSAGE, {})
    assert "\n" not in reason and "File " not in reason and "/srv/" not in reason and "\x1b" not in reason
    assert reason.startswith("model 'vtp' failed to start: FileNotFoundError:") and "serve status" in reason
    status = ModelStatus("vtp", "VTPReplica", False, "DEPLOY_FAILED", 0, reason, detail=SERVE_MESSAGE)
    _, body = readiness({"vtp": status})
    assert "detail" not in body["models"]["vtp"] and "Traceback" not in json.dumps(body)


def test_every_route_is_charged_to_the_budget_of_its_kind() -> None:
    """The model routes are exactly the POST routes but the repository index (a model call or an upload's
    preprocessing each); below a route prefix too."""
    from deployments.ingress import app as ingress_app  # here: Ray Serve's import costs the other fast tests

    for route in ingress_app.routes:
        for method in getattr(route, "methods", None) or ():
            path = route.path.replace("{oip_model}", "vtp.encode").replace("{version}", "1")
            model = method == "POST" and not path.endswith("/repository/index")
            expected = "model" if model else "cheap"
            assert route_kind({"method": method, "path": path}) == expected, (method, path)
            assert route_kind({"method": method, "path": "/rl" + path, "root_path": "/rl"}) == expected
    assert route_kind({"method": "POST", "path": "/v1/nowhere"}) == "cheap"


# ------------------------------------------------------------------------------------------- slow: the app

# One token every 4 s: a refill never lands between a burst and the request past it, however loaded the machine.
RATE_LIMITS = {
    "model": {"rate": 0.25, "burst": 2},
    "cheap": {"rate": 0.25, "burst": 3},
    "refusal_delay_s": 0.5,
    "max_pending_refusals": 2,
}
KEYS = {"team-a": "team-a-key-0001", "rest": "rest-key-0002", "grpc": "grpc-key-0003", "ci": "ci-key-0004"}
RETRY_AFTER = {"1", "2", "3", "4"}  # whole seconds to the next token, at most 1 / rate
CI_BUDGET = {"rate": 100, "burst": 100}
PREFIX = "/rl"


@pytest.fixture(scope="module")
def base_url(serve_instance: ServeInstance) -> str:
    named = {name: {"sha256": sha(key)} for name, key in KEYS.items()}
    named["ci"]["model"] = CI_BUDGET
    args = AppSettings(
        model=TINY,
        image_size=SIZE,
        placement="cpu",
        client_address_header="x-forwarded-for",
        rate_limits=RATE_LIMITS,
        keys={"named": named},
    )
    return deploy(compose_app(args), "rl", PREFIX)


@pytest.fixture(scope="module")
def png() -> bytes:
    return png_bytes(random_image(SIZE, SIZE))


def _as(name: str, client: str) -> dict[str, str]:
    return {"authorization": f"Bearer {KEYS[name]}", "x-forwarded-for": f"192.0.2.1, {client}"}


@pytest.mark.slow
def test_v1_past_the_budget_429_with_retry_after_after_the_pause(base_url: str, png: bytes) -> None:
    headers = {**_as("team-a", "203.0.113.1"), "content-type": "image/png"}
    with httpx.Client(base_url=base_url, timeout=60) as client:
        assert [client.post("/v1/embed", content=png, headers=headers).status_code for _ in range(2)] == [200, 200]
        started = time.monotonic()
        refused = client.post("/v1/embed", content=png, headers=headers)
        took = time.monotonic() - started
        assert refused.status_code == 429, refused.text
        assert 0.45 <= took < 5, took  # answered after refusal_delay_s, not at once
        assert refused.headers["retry-after"] in RETRY_AFTER and refused.headers["connection"] == "close"
        assert "API key 'team-a' is over its rate limit of 0.25 model requests a second" in refused.json()["error"]
        # the key's cheap budget is its own: health and metadata still answer
        assert client.get("/v1/models", headers=_as("team-a", "203.0.113.1")).status_code == 200
        time.sleep(int(refused.headers["retry-after"]) + 0.1)  # one token back
        assert client.post("/v1/embed", content=png, headers=headers).status_code == 200


@pytest.mark.slow
def test_cheap_routes_by_peer_address_and_pending_refusals_capped(base_url: str) -> None:
    """Without the header the client is the peer (here its loopback source address); past the cheap budget,
    at most max_pending_refusals refusals wait out a pause (longer for each one the client already has waiting),
    the others are answered at once."""

    async def run() -> tuple[list[int], list[tuple[int, float]], int]:
        transports = {a: httpx.AsyncHTTPTransport(local_address=a) for a in ("127.0.4.1", "127.0.4.2")}
        async with (
            httpx.AsyncClient(base_url=base_url, transport=transports["127.0.4.1"], timeout=60) as one,
            httpx.AsyncClient(base_url=base_url, transport=transports["127.0.4.2"], timeout=60) as other,
        ):
            burst = [(await one.get("/healthz")).status_code for _ in range(3)]

            async def timed() -> tuple[int, float]:
                started = time.monotonic()
                response = await one.get("/readyz")
                return response.status_code, time.monotonic() - started

            refused = await asyncio.gather(*(timed() for _ in range(4)))
            return burst, refused, (await other.get("/healthz")).status_code

    burst, refused, other = asyncio.run(run())
    assert burst == [200, 200, 200] and other == 200  # another address has its own budget
    assert [status for status, _ in refused] == [429] * 4
    took = sorted(t for _, t in refused)
    assert took[1] < 0.4 and 0.45 <= took[2] < 0.95 <= took[3], took  # two at once, then pauses of 1 and 2 x 0.5 s


@pytest.mark.slow
def test_oip_rest_infer_past_the_budget_429(base_url: str) -> None:
    body = json.dumps(
        {"inputs": [{"name": "IMAGE", "shape": [1, SIZE, SIZE, 3], "datatype": "UINT8", "data": [0] * SIZE * SIZE * 3}]}
    )
    with httpx.Client(base_url=base_url, timeout=60, headers=_as("rest", "203.0.113.3")) as client:
        answers = [client.post("/v2/models/vtp.embed/infer", content=body) for _ in range(3)]
        assert [a.status_code for a in answers] == [200, 200, 429], answers[-1].text
        assert answers[2].headers["retry-after"] in RETRY_AFTER and "rate limit" in answers[2].json()["error"]
        assert client.get("/v2/models/vtp.embed").status_code == 200  # metadata: the cheap budget
        unknown = client.post("/v2/models/vtp.embed/infer", content=body, headers={"authorization": "Bearer nope"})
        assert unknown.status_code == 401  # a wrong key is charged to the address, then refused


@pytest.mark.slow
def test_grpc_past_the_budget_resource_exhausted(base_url: str, serve_instance: ServeInstance) -> None:
    from kserve import InferenceGRPCClient, InferInput, InferRequest

    metadata = [("application", "rl"), ("authorization", f"Bearer {KEYS['grpc']}")]
    pixels = [0] * SIZE * SIZE * 3

    async def run() -> tuple[list[str], grpc.aio.AioRpcError, bool]:
        client = InferenceGRPCClient(serve_instance.grpc_target, timeout=60, retries=0)
        try:
            done = []
            for _ in range(2):
                request = InferRequest("vtp.embed", [InferInput("IMAGE", [1, SIZE, SIZE, 3], "UINT8", data=pixels)])
                done.append((await client.infer(request, headers=metadata)).model_name)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                request = InferRequest("vtp.embed", [InferInput("IMAGE", [1, SIZE, SIZE, 3], "UINT8", data=pixels)])
                await client.infer(request, headers=metadata)
            return done, refused.value, await client.is_server_live(headers=metadata)
        finally:
            await client.close()

    done, refused, live = asyncio.run(run())
    assert done == ["vtp.embed", "vtp.embed"] and live  # ServerLive: the cheap budget
    assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "API key 'grpc' is over its rate limit" in refused.details()
    assert dict(refused.trailing_metadata() or ())["retry-after"] in RETRY_AFTER


@pytest.mark.slow
def test_a_key_with_its_own_budget_and_the_caller_it_sees(base_url: str, png: bytes) -> None:
    with httpx.Client(base_url=base_url, timeout=60, headers=_as("ci", "203.0.113.4")) as client:
        image = {"content": png, "headers": {"content-type": "image/png"}}
        assert {client.post("/v1/preprocess", **image).status_code for _ in range(6)} == {200}  # past the default 2
        caller = client.get("/v1/model").json()["caller"]
        assert caller == {
            "key": "ci",
            "client": "203.0.113.4",
            "model": CI_BUDGET,
            "cheap": RATE_LIMITS["cheap"],
        }
        assert client.get("/v1/model", headers={"authorization": "Bearer team-a-key-000"}).status_code == 401


@pytest.mark.slow
def test_logs_name_the_key_never_the_key(base_url: str, png: bytes) -> None:
    import ray

    with httpx.Client(base_url=base_url, timeout=60, headers=_as("ci", "203.0.113.5")) as client:
        assert client.get("/v1/model").status_code == 200
    logs = Path(ray._private.worker._global_node.get_logs_dir_path()) / "serve"

    def logged() -> str:
        return "".join(p.read_text(errors="replace") for p in logs.glob("replica_rl_VTPIngress_*.log"))

    deadline = time.monotonic() + 10
    while "caller ci client 203.0.113.5 GET /rl/v1/model 200" not in logged() and time.monotonic() < deadline:
        time.sleep(0.2)
    text = logged()
    assert "caller ci client 203.0.113.5 GET /rl/v1/model 200" in text
    assert "caller team-a client 203.0.113.1 POST /rl/v1/embed 429" in text
    assert not [key for key in KEYS.values() if key in text]
