"""The files in examples/ are valid: Serve configs Ray accepts with application args vtp-ray accepts, shell scripts
bash can parse. (Running them needs a real multi-node cluster; tests/test_multinode.py runs the same commands on
one built on this machine.)"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from deployments import AppSettings
from deployments.settings import Batching
from vtp_ray.placement import resolve_placement

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
CONFIGS = sorted(p for p in EXAMPLES.rglob("*.yaml") if "kubernetes" not in p.parts)  # Serve configs
SCRIPTS = sorted(EXAMPLES.rglob("*.sh"))
ASCEND_AND_CUDA = [{"CPU": 192.0, "NPU": 8.0}, {"CPU": 192.0, "NPU": 8.0}, {"CPU": 64.0, "GPU": 4.0}]


def test_there_are_examples() -> None:
    assert CONFIGS and SCRIPTS


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_serve_configs_are_valid_for_ray_and_for_the_app(path: Path) -> None:
    config = ServeDeploySchema.model_validate(yaml.safe_load(path.read_text()))
    assert len({app.route_prefix for app in config.applications}) == len(config.applications)
    for app in config.applications:
        assert app.import_path == "deployments.app:build_app"
        env = (app.runtime_env or {}).get("env_vars", {})
        args = AppSettings.from_args(app.args, environ=env)  # the env vars win, as where the app is built
        placement = resolve_placement(args.placement, ASCEND_AND_CUDA, setting=f"{path.name} {app.name}")
        replica = next(d for d in app.deployments if d.name == "VTPReplica")
        explicit = "ray_actor_options" in replica.model_fields_set
        options = replica.ray_actor_options.model_dump(exclude_unset=True) if explicit else placement
        assert options.get("num_gpus") or (options.get("resources") or {}).get("NPU"), options  # an accelerator each
        assert {d.name for d in app.deployments} <= {"VTPReplica", "VTPIngress"}
        Batching.model_validate(replica.user_config)


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_shell_scripts_parse(path: Path) -> None:
    result = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
