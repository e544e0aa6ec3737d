"""The Kubernetes kit in examples/kubernetes, validated offline: the manifests parse as KubeRay ``ray.io/v1``
resources, the RayService's serveConfigV2 passes Ray's ``ServeDeploySchema`` and vtp-ray's ``AppSettings``, its probes
point at routes the Serve app really serves, Ascend pods declare NPUs to Ray and to Kubernetes, the RayJob's
entrypoint is a command the CLI accepts, and the Dockerfiles copy files that exist. (Nothing here runs a cluster.)"""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from deployments import AppSettings, ingress
from vtp_ray.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
KIT = ROOT / "examples" / "kubernetes"


def _load(name: str) -> dict:
    return yaml.safe_load((KIT / name).read_text())


def _pods(resource: dict) -> list[dict]:
    cluster = resource["spec"].get("rayClusterConfig") or resource["spec"]["rayClusterSpec"]
    return [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]


def test_the_rayservice_serves_a_config_ray_and_the_app_accept():
    service = _load("rayservice.yaml")
    assert (service["apiVersion"], service["kind"]) == ("ray.io/v1", "RayService")
    config = ServeDeploySchema.model_validate(yaml.safe_load(service["spec"]["serveConfigV2"]))
    (application,) = config.applications
    assert application.import_path == "deployments.app:build_app"
    AppSettings.from_args(application.args, environ={})
    replica = next(d for d in application.deployments if d.name == "VTPReplica")
    assert replica.ray_actor_options.resources == {"NPU": 1}


def _ingress_routes() -> set[tuple[str, str]]:
    """``(path, METHOD)`` of every route the ingress's FastAPI app serves, from its OpenAPI description."""
    return {(path, method.upper()) for path, item in ingress.app.openapi()["paths"].items() for method in item}


def test_probes_point_at_routes_the_ingress_serves():
    routes = _ingress_routes()
    assert ("/v1/encode", "POST") in routes
    probes = [
        probe["httpGet"]
        for group in _pods(_load("rayservice.yaml"))
        for container in group["template"]["spec"]["containers"]
        for kind in ("readinessProbe", "livenessProbe")
        if (probe := container.get(kind))
    ]
    assert len(probes) == 4
    for probe in probes:
        assert (probe["path"], "GET") in routes and probe["port"] == 8000
    # readiness follows the models (a pod whose models are down gets no traffic); liveness only the process
    assert [p["path"] for p in probes] == ["/readyz", "/healthz"] * 2


@pytest.mark.parametrize("name", ["rayservice.yaml", "rayjob-tokenize.yaml"])
def test_ascend_workers_declare_npus_to_ray_and_to_kubernetes(name):
    for group in _pods(_load(name))[1:]:
        npus = yaml.safe_load(yaml.safe_load(group["rayStartParams"]["resources"]))["NPU"]
        (container,) = group["template"]["spec"]["containers"]
        assert container["resources"]["limits"]["huawei.com/Ascend910"] == npus == 8
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["ASCEND_OPP_PATH"].startswith("/usr/local/Ascend") and "driver" in env["LD_LIBRARY_PATH"]


def test_the_rayjob_runs_a_tokenize_command_the_cli_accepts():
    job = _load("rayjob-tokenize.yaml")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["vtp-ray", "tokenize"]
    args = build_parser().parse_args(argv[1:])
    assert args.inputs[0].startswith("s3://") and args.output.startswith("s3://") and args.address == "auto"


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.cuda", "Dockerfile.ascend"])
def test_dockerfiles_copy_files_that_exist_and_install_vtp_ray(name):
    lines = (KIT / "docker" / name).read_text().splitlines()
    copies = [line.split()[1:-1] for line in lines if line.startswith("COPY ")]
    assert copies and all((ROOT / source).exists() for sources in copies for source in sources)
    assert any("pip install" in line and "-e ." in line.replace('"', "").replace("[npu]", "") for line in lines)
    if name.endswith("ascend"):
        assert any("torch-npu==" in line for line in lines) and any(
            line.startswith("FROM ") and "cann" in line for line in lines
        )
