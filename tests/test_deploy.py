"""deploy/: the Serve config, the KubeRay manifest and the cluster launcher config parse, validate against
Ray's own schemas, agree with each other and name import paths and files that exist."""
from __future__ import annotations

import importlib
import json
import re
import tomllib
from pathlib import Path

import jsonschema
import ray
import ray.autoscaler
import yaml
from ray import serve
from ray.serve.schema import ServeDeploySchema

from cluster.serve_app import GRPC_SERVICERS

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"


def load(name: str) -> dict:
    return yaml.safe_load((DEPLOY / name).read_text())


def resolve(path: str):
    module, _, attr = path.replace(":", ".").rpartition(".")
    return getattr(importlib.import_module(module), attr)


def test_serve_config_names_the_real_application():
    config = ServeDeploySchema(**load("serve.yaml"))
    assert config.grpc_options.grpc_servicer_functions == list(GRPC_SERVICERS)
    for path in config.grpc_options.grpc_servicer_functions:
        assert callable(resolve(path))
    (app,) = config.applications
    built = resolve(app.import_path)(app.args)  # binds the deployments; loads no model
    assert isinstance(built, serve.Application)
    names = {d.name for d in app.deployments}
    assert names == {"engine", "ingress"}
    assert (REPO / "models" / app.args["model"]).is_dir()
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
    images = {c["image"] for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
              for c in group["template"]["spec"]["containers"]}
    assert len(images) == 1 and re.search(r"-t (\S+) ", dockerfile).group(1) in images


def test_cluster_launcher_config_validates_against_rays_schema():
    config = load("cluster.yaml")
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    assert config["head_node_type"] in config["available_node_types"]
    for source in config["file_mounts"].values():
        assert (REPO / source).resolve() == REPO  # `ray up` runs from the repository root
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    installs = " ".join(config["setup_commands"])
    assert all(extra in extras for extra in re.findall(r'hire\[(\w+)\]', installs)) and "hire[serve]" in installs
