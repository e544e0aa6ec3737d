"""One Serve for every test module that runs on the shared local Ray: started by the first module that asks (HTTP on
loopback, the Open Inference Protocol's gRPC service beside it), kept for the next ones. Each module deploys its
own applications on it with ``deploy`` and ``conftest`` deletes them when the module ends, so no module pays for
Serve's controller and proxies again, and none finds another's routes."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import httpx
import ray
from helpers import free_port
from ray import serve
from ray.serve import Application

#: The proxy's own bound on a request (body, queue, model, answer); the hostile-client tests rely on it.
REQUEST_TIMEOUT_S = 60


@dataclass(frozen=True)
class ServeInstance:
    http_port: int
    grpc_port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"


_instance: ServeInstance | None = None


def shared_serve() -> ServeInstance:
    """Serve on the connected Ray, started once (again after a module stopped that Ray)."""
    global _instance
    from deployments.oip.grpc_service import SERVICER_FUNCTION

    if _instance is None or not _serve_running():
        instance = ServeInstance(free_port(), free_port())
        serve.start(
            http_options={"host": "127.0.0.1", "port": instance.http_port, "request_timeout_s": REQUEST_TIMEOUT_S},
            grpc_options={"port": instance.grpc_port, "grpc_servicer_functions": [SERVICER_FUNCTION]},
        )
        _instance = instance
    return _instance


def deploy(app: Application, name: str, route_prefix: str, *, wait: bool = True) -> str:
    """Run ``app`` on the shared Serve as application ``name`` at ``route_prefix``; with ``wait`` until it is
    running (apps whose replicas never start: ``wait=False``). Returns the app's base URL."""
    instance = shared_serve()
    if wait:
        serve.run(app, name=name, route_prefix=route_prefix)
    else:
        serve._run(app, name=name, route_prefix=route_prefix, _blocking=False)
    return instance.url + route_prefix.rstrip("/")


def wait_running(*names: str, timeout_s: float = 120) -> None:
    """Until every application in ``names`` is RUNNING (deploy several with ``wait=False``, then wait once: their
    replicas start side by side)."""
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        statuses = serve.status().applications
        states = {name: str(getattr(statuses[name].status, "value", "")) if name in statuses else "" for name in names}
        if all(state == "RUNNING" for state in states.values()):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"applications not running after {timeout_s}s: {states}")
        time.sleep(0.2)


def delete_apps() -> None:
    """Delete every application (the controller and the proxies stay, for the next module)."""
    if not _serve_running():
        return
    names = list(serve.status().applications)
    for name in names:
        serve.delete(name, _blocking=False)
    # The replicas are killed rather than left to Serve's graceful stop (which waits for in-flight requests, seconds
    # per module): a module that ends has nothing in flight worth waiting for.
    for replica in replica_actors(*names):
        ray.kill(replica, no_restart=True)
    deadline = time.monotonic() + 120
    while serve.status().applications:
        assert time.monotonic() < deadline, f"applications still there after 120 s: {list(serve.status().applications)}"
        time.sleep(0.1)


@contextmanager
def client(base_url: str, timeout: float = 60) -> Iterator[httpx.Client]:
    """An HTTP client for a deployed app."""
    with httpx.Client(base_url=base_url, timeout=timeout) as c:
        yield c


def replica_actors(*apps: str, deployment: str = "") -> list[ray.actor.ActorHandle]:
    """The live replica actors of the applications ``apps`` (of their ``deployment`` only, when given): Serve names
    them ``SERVE_REPLICA::<app>#<deployment>#<id>``."""
    from ray.serve._private.constants import SERVE_NAMESPACE

    prefixes = tuple(f"SERVE_REPLICA::{app}#{deployment}{'#' if deployment else ''}" for app in apps)
    handles = []
    for actor in ray.util.list_named_actors(all_namespaces=True):
        if actor["namespace"] == SERVE_NAMESPACE and actor["name"].startswith(prefixes):
            with contextlib.suppress(ValueError):  # already gone
                handles.append(ray.get_actor(actor["name"], namespace=SERVE_NAMESPACE))
    return handles


def _serve_running() -> bool:
    try:
        serve.status()
    except Exception:  # no controller: Serve was shut down (or never started) on this Ray
        return False
    return True
