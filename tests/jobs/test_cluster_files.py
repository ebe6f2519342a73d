"""Every file under cluster/: parsed, checked against its schema, and held to the security and storage rules.

Kubernetes objects and the pod templates inside the KubeRay resources are checked against the Kubernetes
OpenAPI schema (kubernetes-validate, strict: unknown fields fail). The KubeRay resources themselves are checked
against KUBERAY_SCHEMA below, the part of the ray.io/v1 CRDs (KubeRay 1.5) these files use, written from the
Go types (raycluster_types.go, rayjob_types.go): the CRD files are not on PyPI. The launcher config is checked
against the schema Ray ships in its wheel (ray/autoscaler/ray-schema.json).
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

from instune.config import load_config
from instune.ray_jobs import STAGES, check_paths_for_cluster

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
SHARED_MOUNT = "/mnt/shared"

kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install -e '.[test]' brings it")

_INT32 = {"type": "integer", "minimum": 0, "maximum": 2**31 - 1}
_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_OBJECT = {"type": "object"}
KUBERAY_SCHEMA = {
    "$defs": {
        "headGroupSpec": {
            "type": "object", "additionalProperties": False, "required": ["rayStartParams", "template"],
            "properties": {"serviceType": {"enum": ["ClusterIP", "NodePort", "LoadBalancer"]},
                           "headService": _OBJECT, "enableIngress": {"type": "boolean"},
                           "rayStartParams": _STRING_MAP, "template": _OBJECT}},
        "workerGroupSpec": {
            "type": "object", "additionalProperties": False,
            "required": ["groupName", "minReplicas", "maxReplicas", "rayStartParams", "template"],
            "properties": {"groupName": {"type": "string", "minLength": 1}, "replicas": _INT32,
                           "minReplicas": _INT32, "maxReplicas": _INT32,
                           "numOfHosts": {"type": "integer", "minimum": 1},
                           "idleTimeoutSeconds": _INT32, "suspend": {"type": "boolean"},
                           "rayStartParams": _STRING_MAP, "template": _OBJECT, "scaleStrategy": _OBJECT}},
        "rayClusterSpec": {
            "type": "object", "additionalProperties": False, "required": ["headGroupSpec"],
            "properties": {
                "headGroupSpec": {"$ref": "#/$defs/headGroupSpec"},
                "workerGroupSpecs": {"type": "array", "items": {"$ref": "#/$defs/workerGroupSpec"}},
                "rayVersion": {"type": "string"}, "enableInTreeAutoscaling": {"type": "boolean"},
                "autoscalerOptions": {
                    "type": "object", "additionalProperties": False,
                    "properties": {"upscalingMode": {"enum": ["Default", "Aggressive", "Conservative"]},
                                   "idleTimeoutSeconds": _INT32, "resources": _OBJECT, "image": {"type": "string"},
                                   "imagePullPolicy": {"type": "string"}, "env": {"type": "array"},
                                   "envFrom": {"type": "array"}, "volumeMounts": {"type": "array"},
                                   "securityContext": _OBJECT}},
                "authOptions": {"type": "object", "additionalProperties": False,
                                "properties": {"mode": {"enum": ["disabled", "token"]},
                                               "secretName": {"type": "string"},
                                               "enableK8sTokenAuth": {"type": "boolean"}}},
                "headServiceAnnotations": _STRING_MAP, "suspend": {"type": "boolean"},
                "managedBy": {"type": "string"}, "gcsFaultToleranceOptions": _OBJECT}},
        "metadata": {"type": "object", "required": ["name"],
                     "properties": {"name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
                                    "labels": _STRING_MAP}},
    },
    "oneOf": [
        {"type": "object", "additionalProperties": False, "required": ["apiVersion", "kind", "metadata", "spec"],
         "properties": {"apiVersion": {"const": "ray.io/v1"}, "kind": {"const": "RayCluster"},
                        "metadata": {"$ref": "#/$defs/metadata"}, "spec": {"$ref": "#/$defs/rayClusterSpec"}}},
        {"type": "object", "additionalProperties": False, "required": ["apiVersion", "kind", "metadata", "spec"],
         "properties": {
             "apiVersion": {"const": "ray.io/v1"}, "kind": {"const": "RayJob"},
             "metadata": {"$ref": "#/$defs/metadata"},
             "spec": {"type": "object", "additionalProperties": False, "required": ["entrypoint"],
                      "properties": {
                          "entrypoint": {"type": "string", "minLength": 1}, "runtimeEnvYAML": {"type": "string"},
                          "rayClusterSpec": {"$ref": "#/$defs/rayClusterSpec"}, "clusterSelector": _STRING_MAP,
                          "shutdownAfterJobFinishes": {"type": "boolean"}, "ttlSecondsAfterFinished": _INT32,
                          "activeDeadlineSeconds": {"type": "integer", "minimum": 1}, "backoffLimit": _INT32,
                          "submissionMode": {"enum": ["K8sJobMode", "HTTPMode", "InteractiveMode"]},
                          "entrypointNumCpus": {"type": "number"}, "entrypointNumGpus": {"type": "number"},
                          "entrypointResources": {"type": "string"}, "metadata": _STRING_MAP,
                          "jobId": {"type": "string"}, "suspend": {"type": "boolean"},
                          "submitterPodTemplate": _OBJECT, "submitterConfig": _OBJECT}}}},
    ],
}


def load_yaml(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def validate_kubernetes(obj: dict) -> None:
    """Strict check against the newest Kubernetes schema kubernetes-validate has; raises on any problem."""
    kubernetes_validate.validate(obj, kubernetes_validate.utils.latest_version(), strict=True)


def pod_templates(cluster_spec: dict) -> dict[str, dict]:
    groups = {"head": cluster_spec["headGroupSpec"]}
    groups.update({g["groupName"]: g for g in cluster_spec.get("workerGroupSpecs", [])})
    return {name: group["template"] for name, group in groups.items()}


def check_ray_cluster_spec(spec: dict, claim_name: str) -> None:
    """What instune needs from any KubeRay cluster: token auth, a private head, shared storage everywhere."""
    assert spec["rayVersion"] == ray.__version__, "rayVersion must match the Ray the project installs"
    assert spec["authOptions"]["mode"] == "token"
    assert spec["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP", "never expose the head"
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0", "the head schedules, it does not train"
    for group in spec.get("workerGroupSpecs", []):
        replicas = group.get("replicas", group["minReplicas"])
        assert group["minReplicas"] <= replicas <= group["maxReplicas"], group["groupName"]
    for name, template in pod_templates(spec).items():
        validate_kubernetes({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": f"check-{name}"},
                             "template": template})
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"]
                  for v in template["spec"]["volumes"] if "persistentVolumeClaim" in v}
        for container in template["spec"]["containers"]:
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            assert claims.get(mounts.get(SHARED_MOUNT)) == claim_name, f"{name} must mount {claim_name}"
            assert container["resources"]["requests"] == container["resources"]["limits"], name
            assert not container.get("env"), f"{name}: secrets come from authOptions, not env in a manifest"


def test_kuberay_schema_rejects_what_the_crd_rejects():
    broken = load_yaml("kuberay/raycluster.yaml")
    del broken["spec"]["workerGroupSpecs"][0]["maxReplicas"]
    with pytest.raises(jsonschema.ValidationError, match="maxReplicas"):
        jsonschema.validate(broken, KUBERAY_SCHEMA)
    typo = load_yaml("kuberay/raycluster.yaml")
    typo["spec"]["headGroupSpec"]["rayStartParam"] = {}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(typo, KUBERAY_SCHEMA)


def test_kubernetes_schema_rejects_a_broken_pod_template():
    template = load_yaml("kuberay/raycluster.yaml")["spec"]["workerGroupSpecs"][0]["template"]
    template["spec"]["containers"][0]["resources"]["limits"]["cpu"] = ["8"]
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_kubernetes({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "x"},
                             "template": template})


def test_shared_storage_claim_is_valid_and_read_write_many():
    claim = load_yaml("kuberay/shared-storage.yaml")
    validate_kubernetes(claim)
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]


def test_raycluster_has_a_cpu_head_and_autoscaling_gpu_workers():
    cluster = load_yaml("kuberay/raycluster.yaml")
    jsonschema.validate(cluster, KUBERAY_SCHEMA)
    spec = cluster["spec"]
    check_ray_cluster_spec(spec, load_yaml("kuberay/shared-storage.yaml")["metadata"]["name"])
    assert spec["enableInTreeAutoscaling"] is True
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    gpu = groups["gpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert gpu["nvidia.com/gpu"] == "1"
    assert (groups["gpu"]["minReplicas"], groups["gpu"]["maxReplicas"]) == (0, 4)
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert "nvidia.com/gpu" not in head


def test_rayjob_runs_a_stage_on_a_config_that_is_fit_for_a_cluster():
    job = load_yaml("kuberay/rayjob.yaml")
    jsonschema.validate(job, KUBERAY_SCHEMA)
    check_ray_cluster_spec(job["spec"]["rayClusterSpec"], load_yaml("kuberay/shared-storage.yaml")["metadata"]["name"])
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    # The image installs the project from /app (cluster/Dockerfile): the stage and config must exist here.
    python, m, module, stage, config, *overrides = shlex.split(job["spec"]["entrypoint"])
    assert (python, m, module) == ("python", "-m", "instune") and config.startswith("/app/")
    assert stage in STAGES
    loaded = load_config(REPO / config.removeprefix("/app/"), [o for o in overrides if o != "--set"])
    check_paths_for_cluster(loaded, config)
    assert loaded.output_dir.startswith(SHARED_MOUNT + "/")


def test_cluster_quickstart_config_is_the_quickstart_on_shared_storage():
    cluster_config = load_config(CLUSTER / "quickstart.yaml")
    check_paths_for_cluster(cluster_config, "cluster/quickstart.yaml")
    assert cluster_config.scaling.placement_strategy == "STRICT_SPREAD" and cluster_config.scaling.use_gpu
    local = load_config(REPO / "configs" / "quickstart.yaml")
    # The same experiment: only where the files go and how the workers are placed differ.
    for section in ("model", "peft", "train", "strategy"):
        assert getattr(cluster_config, section) == getattr(local, section), section
    assert cluster_config.data.corpus.model_dump(exclude={"dir"}) == local.data.corpus.model_dump(exclude={"dir"})
    assert cluster_config.data.corpus.dir == f"{cluster_config.output_dir}/corpus"
    assert [(s.name, s.format, Path(s.path).name) for s in cluster_config.data.sources] == \
        [(s.name, s.format, Path(s.path).name) for s in local.data.sources]
    assert [(e.name, e.kind, Path(e.path).name) for e in cluster_config.eval.sets] == \
        [(e.name, e.kind, Path(e.path).name) for e in local.eval.sets]


def test_dockerfile_base_image_matches_the_ray_version_and_copies_what_exists():
    lines = [line.strip() for line in (CLUSTER / "Dockerfile").read_text().splitlines()
             if line.strip() and not line.lstrip().startswith("#")]
    base = next(line.split()[1] for line in lines if line.startswith("FROM "))
    assert re.fullmatch(rf"rayproject/ray:{re.escape(ray.__version__)}-py3\d+-gpu", base)
    copied = [word for line in lines if line.startswith("COPY ") for word in line.split()[1:-1]
              if not word.startswith("--")]
    assert "instune" in copied and "cluster" in copied
    for source in copied:
        assert (REPO / source).exists(), f"Dockerfile copies {source}, which the project lacks"


def test_launcher_config_passes_rays_schema_and_keeps_the_head_private():
    config = load_yaml("launcher/aws.yaml")
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    assert sum(t.get("min_workers", 0) for t in types.values()) <= config["max_workers"]
    assert types["head"]["resources"] == {"CPU": 0}
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start and "RAY_AUTH_MODE=token ray start --head" in head_start
    assert "RAY_AUTH_MODE=token ray start --address" in " ".join(config["worker_start_ray_commands"])
    assert config["file_mounts"]["/home/ubuntu/instune"] == "."
    assert {"**/.git", "**/.venv", "**/outputs"} <= set(config["rsync_exclude"])
    assert any(SHARED_MOUNT in command for command in config["setup_commands"])


def test_launcher_schema_rejects_an_unknown_key():
    config = load_yaml("launcher/aws.yaml")
    config["available_node_types"]["gpu_worker"]["min_worker"] = 1
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    with pytest.raises(jsonschema.ValidationError, match="min_worker"):
        jsonschema.validate(config, schema)


@pytest.mark.parametrize("script", ["start_head.sh", "start_worker.sh"])
def test_static_recipe_scripts_parse_and_require_token_auth(script):
    path = CLUSTER / "static" / script
    subprocess.run(["bash", "-n", str(path)], check=True)
    text = path.read_text()
    assert 'export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"' in text
    assert "exec ray start" in text


def test_static_head_binds_the_dashboard_to_loopback_only():
    text = (CLUSTER / "static" / "start_head.sh").read_text()
    assert "--dashboard-host 127.0.0.1" in text
    assert "0.0.0.0" not in text
