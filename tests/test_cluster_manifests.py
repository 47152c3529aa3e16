"""cluster/: the cluster launcher YAML and the KubeRay RayService / RayJob manifests parse, pass Ray's own schemas,
and agree with the code: the Serve import path and its args, the batch job's entrypoint and flags, the Ray
version, and GPUs and CPUs enough for replicas x tensor_parallel_size with each TP group on one node or pod."""

from __future__ import annotations

import importlib
import importlib.util
import re
import shlex
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
import ray
import yaml

from deployments.app import LLMAppArgs
from deployments.batch_job import build_parser, engine_settings
from nanovllm_ray.config import Config

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Serve's pydantic models

CLUSTER = Path(__file__).resolve().parent.parent / "cluster"
CONFIG_KEYS = {f.name for f in fields(Config)} - {"hf_config", "model"}


def _load(name: str) -> dict[str, Any]:
    return yaml.safe_load((CLUSTER / name).read_text())


def _pods(cluster_spec: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(head pod spec, [worker group]) of a RayCluster spec."""
    return cluster_spec["headGroupSpec"]["template"]["spec"], cluster_spec["workerGroupSpecs"]


def _container(pod_spec: dict[str, Any]) -> dict[str, Any]:
    (container,) = [c for c in pod_spec["containers"] if c["name"].startswith("ray-")]
    return container


def _gpus(container: dict[str, Any]) -> int:
    limits = container.get("resources", {}).get("limits", {})
    return int(limits.get("nvidia.com/gpu", 0))


def _cpus(container: dict[str, Any]) -> float:
    cpu = str(container["resources"]["limits"]["cpu"])
    return int(cpu[:-1]) / 1000 if cpu.endswith("m") else float(cpu)


def _mounted(pod_spec: dict[str, Any], path: str) -> bool:
    mounts = [m["mountPath"].rstrip("/") + "/" for m in _container(pod_spec).get("volumeMounts", [])]
    volumes = {v["name"] for v in pod_spec.get("volumes", [])}
    names = {m["name"] for m in _container(pod_spec).get("volumeMounts", [])}
    return names <= volumes and any(path.rstrip("/") + "/" == m or path.startswith(m) for m in mounts)


def _check_fit(cluster_spec: dict[str, Any], replicas: int, tp: int, cpus_per_rank: float) -> None:
    """Each replica is a STRICT_PACK group of tp bundles {GPU: 1, CPU: cpus_per_rank}: one pod must hold a
    whole group, and the worker pods together all the groups."""
    _, groups = _pods(cluster_spec)
    fits = 0
    for g in groups:
        c = _container(g["template"]["spec"])
        per_pod = _gpus(c) // tp
        assert per_pod * tp * cpus_per_rank <= _cpus(c), f"{g['groupName']}: too few CPUs for its TP groups"
        fits += per_pod * max(g.get("maxReplicas", g["replicas"]), g["replicas"])
    assert fits >= replicas, f"{replicas} replicas x tp={tp} do not fit the worker pods"


def _check_ray_cluster(cluster_spec: dict[str, Any]) -> None:
    assert cluster_spec["rayVersion"] == ray.__version__
    head, groups = _pods(cluster_spec)
    assert cluster_spec["headGroupSpec"]["rayStartParams"]["num-gpus"] == "0"  # no GPU work on the head
    images = {_container(head)["image"]} | {_container(g["template"]["spec"])["image"] for g in groups}
    assert len(images) == 1, f"one image for every pod, got {images}"
    for g in groups:
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
        assert _mounted(g["template"]["spec"], "/dev/shm"), "Ray's object store needs a large /dev/shm"


# ---- the cluster launcher --------------------------------------------------------------------------------------


def test_cluster_launcher_config_passes_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = _load("ray-cluster.yaml")
    validate_config(prepare_config(config))  # fills the AWS defaults, then Ray's JSON schema
    assert config["head_node_type"] in config["available_node_types"]
    assert config["docker"]["image"].startswith(f"rayproject/ray:{ray.__version__}-")
    assert config["available_node_types"][config["head_node_type"]]["resources"].get("GPU", 0) == 0


def test_cluster_launcher_installs_the_project_and_fits_the_batch_job():
    config = _load("ray-cluster.yaml")
    (target,) = [dst for dst, src in config["file_mounts"].items() if src == "."]
    assert any(re.search(rf"pip install .*-e {re.escape(target)}\b", c) for c in config["setup_commands"])
    assert ".venv" in config["rsync_exclude"] and "checkpoints" in config["rsync_exclude"]
    # The RayJob's parallelism (the README runs the same job here): a TP group on one node, all groups in max_workers.
    args = _rayjob_args()
    gpu_types = [t for t in config["available_node_types"].values() if t["resources"].get("GPU", 0) > 0]
    assert gpu_types
    per_node = [(t["resources"]["GPU"] // args.tensor_parallel_size, t) for t in gpu_types]
    assert max(n for n, _ in per_node) >= 1, "no node holds a whole tensor-parallel group"
    assert sum(n * t["max_workers"] for n, t in per_node) >= args.replicas
    for n, t in per_node:
        assert n * args.tensor_parallel_size * args.worker_num_cpus <= t["resources"]["CPU"]


# ---- the RayService (the Serve app) ----------------------------------------------------------------------------


def _serve_config() -> dict[str, Any]:
    return yaml.safe_load(_load("rayservice.yaml")["spec"]["serveConfigV2"])


def test_rayservice_serve_config_passes_serves_schema():
    from ray.serve.schema import ServeDeploySchema

    doc = _load("rayservice.yaml")
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayService")
    schema = ServeDeploySchema.model_validate(_serve_config())
    assert schema.http_options.host == "0.0.0.0"  # reachable through KubeRay's Serve service


def test_rayservice_import_path_and_args_match_the_app():
    (app,) = _serve_config()["applications"]
    module, _, attr = app["import_path"].partition(":")
    assert app["import_path"] == "deployments.app:build_app"
    assert callable(getattr(importlib.import_module(module), attr))
    args = LLMAppArgs.model_validate(app["args"])  # an unknown key or a value out of range fails here
    assert set(args.config_kwargs()) <= CONFIG_KEYS
    assert args.device == "cuda" and isinstance(args.num_replicas, int)

    cluster = _load("rayservice.yaml")["spec"]["rayClusterConfig"]
    _check_ray_cluster(cluster)
    _check_fit(cluster, args.num_replicas, args.tensor_parallel_size, args.worker_num_cpus)
    head, groups = _pods(cluster)
    assert _mounted(head, args.model), "build_app reads the model's config.json on the head"
    for g in groups:
        assert _mounted(g["template"]["spec"], args.model)
    assert 8000 in [p["containerPort"] for p in _container(head)["ports"]]
    # readiness (and the workers' liveness) follow the app's /health, which tells whether an engine is alive
    for pod in [head] + [g["template"]["spec"] for g in groups]:
        probe = _container(pod)["readinessProbe"]["httpGet"]
        assert (probe["path"], probe["port"]) == ("/health", 8000)
    for g in groups:
        assert _container(g["template"]["spec"])["livenessProbe"]["httpGet"]["path"] == "/health"


# ---- the RayJob (the batch job) --------------------------------------------------------------------------------


def _rayjob_args():
    argv = shlex.split(_load("rayjob.yaml")["spec"]["entrypoint"])
    assert argv[:3] == ["python", "-m", "deployments.batch_job"]
    return build_parser().parse_args(argv[3:])  # argparse exits (SystemExit) on an unknown flag


def test_rayjob_entrypoint_is_the_batch_job_and_its_flags_parse():
    doc = _load("rayjob.yaml")
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayJob")
    assert importlib.util.find_spec("deployments.batch_job") is not None
    args = _rayjob_args()
    assert set(engine_settings(args)) <= CONFIG_KEYS
    assert args.device == "cuda" and args.summary

    spec = doc["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    _check_ray_cluster(spec["rayClusterSpec"])
    _check_fit(spec["rayClusterSpec"], args.replicas, args.tensor_parallel_size,
               args.worker_num_cpus or Config.default("worker_num_cpus"))
    head, groups = _pods(spec["rayClusterSpec"])
    # The driver runs on the head: it reads the input and writes the output and the summary there.
    for path in (args.input, args.output, args.summary):
        assert _mounted(head, path), f"{path} is on no volume of the head pod"
    for g in groups:
        assert _mounted(g["template"]["spec"], args.model)


@pytest.mark.parametrize("name", ["rayservice.yaml", "rayjob.yaml"])
def test_manifest_image_is_built_from_the_dockerfile(name):
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    (base,) = re.findall(r"^FROM (\S+)", dockerfile, flags=re.M)
    assert base.startswith(f"rayproject/ray:{ray.__version__}-")
    doc = _load(name)
    spec = doc["spec"].get("rayClusterConfig") or doc["spec"]["rayClusterSpec"]
    image = _container(_pods(spec)[0])["image"]
    assert f"-t {image} ." in dockerfile, f"the Dockerfile's build command does not tag {image}"
    assert "deployments" in dockerfile and "nanovllm_ray" in dockerfile
