"""deploy/: the Serve config, the KubeRay manifest and the cluster launcher config parse, validate against
Ray's own schemas, agree with each other, name import paths and files that exist, and are secure by default (an
API key on every call, from a Kubernetes Secret in the KubeRay manifest; Ray's dashboard not open)."""
from __future__ import annotations

import importlib
import json
import re
import tomllib
from pathlib import Path

import jsonschema
import pytest
import ray
import ray.autoscaler
import yaml
from ray import serve
from ray.serve.schema import ServeDeploySchema

from cluster.serve_app import GRPC_SERVICERS
from hire.registry import REGISTRY

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"


def load(name: str) -> dict:
    return yaml.safe_load((DEPLOY / name).read_text())


def resolve(path: str):
    module, _, attr = path.replace(":", ".").rpartition(".")
    return getattr(importlib.import_module(module), attr)


def test_serve_config_names_the_real_application(monkeypatch):
    config = ServeDeploySchema(**load("serve.yaml"))
    assert config.grpc_options.grpc_servicer_functions == list(GRPC_SERVICERS)
    for path in config.grpc_options.grpc_servicer_functions:
        assert callable(resolve(path))
    (app,) = config.applications
    monkeypatch.delenv("HIRE_API_KEY", raising=False)
    with pytest.raises(ValueError, match="api_keys: no API key; set \\$HIRE_API_KEY"):
        resolve(app.import_path)(app.args)  # no key, and not said to be insecure: refused
    monkeypatch.setenv("HIRE_API_KEY", "k1,k2")
    built = resolve(app.import_path)(app.args)  # binds the deployments; loads no model
    assert isinstance(built, serve.Application)
    names = {d.name for d in app.deployments}
    assert names == {"engine", "ingress"}
    assert app.args["model"] in REGISTRY or (REPO / "models" / app.args["model"]).is_dir()
    engine = next(d for d in app.deployments if d.name == "engine")
    assert engine.max_ongoing_requests >= app.args["slots"] + app.args["queue_size"]


def test_kuberay_manifest_serves_the_same_config():
    manifest = load("rayservice.yaml")
    assert (manifest["apiVersion"], manifest["kind"]) == ("ray.io/v1", "RayService")
    assert yaml.safe_load(manifest["spec"]["serveConfigV2"]) == load("serve.yaml")
    cluster = manifest["spec"]["rayClusterConfig"]
    assert cluster["rayVersion"] == ray.__version__
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert f"rayproject/ray:{ray.__version__}-py311" in dockerfile
    containers = [c for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
                  for c in group["template"]["spec"]["containers"]]
    images = {c["image"] for c in containers}
    assert len(images) == 1 and re.search(r"-t (\S+) ", dockerfile).group(1) in images
    for container in containers:  # the API key from a Secret wherever the application may be built
        env = {e["name"]: e for e in container["env"]}
        assert env["HIRE_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "hire-api-key", "key": "key"}
        assert int(env["RAY_SERVE_GRPC_MAX_MESSAGE_SIZE"]["value"]) == 4 * 2**20
    assert cluster["authOptions"] == {"mode": "token"}  # Ray's dashboard and jobs API need Ray's token
    assert "dashboard-host" not in cluster["headGroupSpec"]["rayStartParams"]
    assert 10001 not in {p["containerPort"] for c in containers for p in c.get("ports", [])}  # no Ray Client


def test_cluster_launcher_config_validates_against_rays_schema():
    config = load("cluster.yaml")
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    assert config["head_node_type"] in config["available_node_types"]
    assert config["file_mounts"].pop("~/.hire_api_key") == "~/.hire_api_key"  # the key, not from the repository
    for source in config["file_mounts"].values():
        assert (REPO / source).resolve() == REPO  # `ray up` runs from the repository root
    for commands in (config["head_start_ray_commands"], config["worker_start_ray_commands"]):
        assert "export HIRE_API_KEY=$(cat ~/.hire_api_key)" in commands[-1]
    assert "--dashboard-host=127.0.0.1" in config["head_start_ray_commands"][-1]
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    installs = " ".join(config["setup_commands"])
    assert all(extra in extras for extra in re.findall(r'hire\[(\w+)\]', installs)) and "hire[serve]" in installs
