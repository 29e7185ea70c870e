"""cluster.yaml passes Ray's own cluster-launcher validator offline, the KubeRay manifests carry the
fields the operator requires, and a broken copy of each fails (never `ray up` / kubectl in CI)."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def validate_cluster_yaml(config: dict) -> None:
    """Ray's validator: prepare_config (defaults of the provider) then validate_config (the schema)."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(config)))


def _get(node: dict, path: str) -> object:
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(path)
        node = node[part]
    return node


def _containers(template: dict, where: str) -> None:
    containers = _get(template, "spec.containers")
    if not containers or not all(c.get("name") and c.get("image") for c in containers):
        raise KeyError(f"{where}.template.spec.containers[*].name/image")


def check_kuberay(documents: list[dict]) -> None:
    """The fields KubeRay (ray.io/v1) requires of a RayCluster and a RayJob; KeyError names a missing one."""
    for doc in documents:
        if doc.get("apiVersion") != "ray.io/v1" or doc.get("kind") not in ("RayCluster", "RayJob"):
            raise KeyError(f"apiVersion ray.io/v1 and kind RayCluster|RayJob, got {doc.get('apiVersion')} {doc.get('kind')}")
        _get(doc, "metadata.name")
        if doc["kind"] == "RayJob":
            _get(doc, "spec.entrypoint")
            if "rayClusterSpec" not in doc["spec"] and "clusterSelector" not in doc["spec"]:
                raise KeyError("spec.rayClusterSpec or spec.clusterSelector")
            if "rayClusterSpec" not in doc["spec"]:
                continue
        spec = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]
        if not isinstance(_get(spec, "headGroupSpec.rayStartParams"), dict):
            raise KeyError("headGroupSpec.rayStartParams")
        _containers(_get(spec, "headGroupSpec.template"), "headGroupSpec")
        for group in spec.get("workerGroupSpecs", []):
            for key in ("groupName", "rayStartParams", "template"):
                _get(group, key)
            if not group.get("minReplicas", 0) <= group.get("replicas", 0) <= group.get("maxReplicas", 2**31):
                raise KeyError(f"workerGroupSpecs {group['groupName']}: minReplicas <= replicas <= maxReplicas")
            _containers(group["template"], f"workerGroupSpecs {group['groupName']}")


def test_cluster_yaml_validates_and_broken_copies_fail():
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    validate_cluster_yaml(config)
    gpu = config["available_node_types"]["gpu_worker"]
    assert gpu["min_workers"] == 0 and gpu["max_workers"] > 0  # autoscaling GPU workers
    assert config["available_node_types"]["head"]["resources"] == {"CPU": 0}  # the head trains nothing
    assert any("download.pytorch.org/whl/cu" in c for c in config["setup_commands"])  # the CUDA torch
    assert any("pip install -e ~/perturbot" in c for c in config["setup_commands"])
    misspelled = copy.deepcopy(config)
    misspelled["available_node_types"]["gpu_worker"]["max_worker"] = misspelled["available_node_types"]["gpu_worker"].pop("max_workers")
    wrong_type = copy.deepcopy(config)
    wrong_type["max_workers"] = "eight"
    no_head = copy.deepcopy(config)
    no_head["head_node_type"] = "cpu_head"
    for broken in (misspelled, wrong_type, no_head):
        with pytest.raises(Exception):
            validate_cluster_yaml(broken)


def test_kuberay_manifests_have_the_required_fields_and_broken_copies_fail():
    documents = list(yaml.safe_load_all((ROOT / "jobs" / "kuberay.yaml").read_text()))
    assert [d["kind"] for d in documents] == ["RayCluster", "RayJob"]
    check_kuberay(documents)
    assert "jobs.train" in documents[1]["spec"]["entrypoint"]
    for damage in (lambda d: d[0]["spec"]["headGroupSpec"].pop("rayStartParams"),
                   lambda d: d[0]["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0].pop("image"),
                   lambda d: d[0]["spec"]["workerGroupSpecs"][0].update(minReplicas=9),
                   lambda d: d[1]["spec"].pop("entrypoint"),
                   lambda d: d[1].update(apiVersion="ray.io/v1alpha0")):
        broken = copy.deepcopy(documents)
        damage(broken)
        with pytest.raises(KeyError):
            check_kuberay(broken)


@pytest.mark.parametrize("spec", sorted((ROOT / "jobs" / "specs").glob("*.yaml")), ids=lambda p: p.stem)
def test_job_specs_are_run_configs(spec):
    from engine.config import RunConfig

    config = RunConfig.load(spec)
    assert config.train.steps >= 1 and config.cluster.workers >= 1
