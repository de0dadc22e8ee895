"""deploy/ and the Containerfile: every manifest validates against pinned Kubernetes and KServe
schemas, and says what the image and the code say (port, health paths, user, grace period).

Kubernetes kinds are validated by kubernetes-validate (its strict schemas, generated from each
release's OpenAPI spec) for the oldest and the newest release the manifests are meant for. The
InferenceService is validated by jsonschema against the CRD of KServe's own repository
(deploy/schemas/, pinned by release and SHA-256), with unknown fields refused, as the API
server's strict field validation (kubectl's default) refuses them.
"""
from __future__ import annotations

import copy
import functools
import gzip
import hashlib
import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from harness.services import REPO
from pipeline import contract, params
from serving.config import ServeConfig, command_line
from tests.test_architecture import closure

KUBERNETES = ("1.30", "1.37")  # 1.30: the first with the preStop sleep action on by default
KSERVE_CRD = REPO / "deploy/schemas/kserve-v0.20.0-inferenceservices.yaml.gz"
# kserve/kserve at tag v0.20.0: config/crd/full/serving.kserve.io_inferenceservices.yaml, as published
KSERVE_CRD_SHA256 = "57c3bf13f77de94678bf2ae3748056ec071ad2b9e88d6a28f44fb4710758fcff"
HEALTH = {"livenessProbe": "/v2/health/live", "readinessProbe": "/v2/health/ready"}


def manifests() -> list[tuple[str, dict]]:
    """(a name for it, the object) for every document of every YAML file under deploy/."""
    found = []
    for path in sorted((REPO / "deploy").rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                found.append((f"{path.relative_to(REPO)}:{doc['kind']}/{doc['metadata']['name']}", doc))
    return found


MANIFESTS = manifests()


def strict(schema: Any) -> Any:
    """``schema`` with unknown fields refused wherever the CRD lists the fields and does not
    itself keep unknown ones (x-kubernetes-preserve-unknown-fields)."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if "properties" in out and "additionalProperties" not in out \
            and not out.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


@functools.cache
def kserve_validator() -> jsonschema.Draft202012Validator:
    raw = gzip.decompress(KSERVE_CRD.read_bytes())
    assert hashlib.sha256(raw).hexdigest() == KSERVE_CRD_SHA256, f"{KSERVE_CRD} is not the pinned KServe CRD"
    crd = yaml.load(raw, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # libyaml: 5x faster on its 2 MB
    (version,) = (v for v in crd["spec"]["versions"] if v["name"] == "v1beta1")
    return jsonschema.Draft202012Validator(strict(version["schema"]["openAPIV3Schema"]))


def problems(doc: dict) -> list[str]:
    """What the pinned schemas find wrong with ``doc``, one line each ('where: what')."""
    if doc["apiVersion"].startswith("serving.kserve.io/"):
        assert (doc["apiVersion"], doc["kind"]) == ("serving.kserve.io/v1beta1", "InferenceService")
        return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in kserve_validator().iter_errors(doc)]
    found = []
    for version in KUBERNETES:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            found.append(f"Kubernetes {version}: {'.'.join(map(str, e.path))}: {e.message}")
    return found


@pytest.mark.parametrize("name,doc", MANIFESTS, ids=[n for n, _ in MANIFESTS])
def test_every_manifest_validates_against_the_pinned_schemas(name, doc):
    assert not problems(doc)


def test_deploy_holds_the_objects_the_docs_name():
    kinds = sorted(name.split(":")[1] for name, _ in MANIFESTS)
    assert kinds == ["Deployment/mnist-onnx-serve", "HorizontalPodAutoscaler/mnist-onnx-serve",
                     "InferenceService/mnist-cnn-onnx-triton", "InferenceService/mnist-onnx-serve",
                     "Service/mnist-onnx-serve"]


def find(kind: str, name: str) -> dict:
    return copy.deepcopy(next(d for n, d in MANIFESTS if n.endswith(f":{kind}/{name}")))


@pytest.mark.parametrize("kind,name,where,wrong,expected", [
    ("Deployment", "mnist-onnx-serve", ("spec", "template", "spec", "containers", 0), ("readinesProbe", {}),
     r"Additional properties are not allowed \('readinesProbe' was unexpected\)"),
    ("Deployment", "mnist-onnx-serve", ("spec", "template", "spec", "containers", 0, "ports", 0),
     ("containerPort", "8000"), r"'8000' is not of type 'integer'"),
    ("HorizontalPodAutoscaler", "mnist-onnx-serve", ("spec",), ("minReplicas", "two"), "is not of type 'integer'"),
    ("Service", "mnist-onnx-serve", ("spec",), ("type", ["ClusterIP"]), "is not of type 'string'"),
    ("InferenceService", "mnist-cnn-onnx-triton", ("spec", "predictor", "model"), ("modelFormat", {"nam": "onnx"}),
     "'name' is a required property"),
    ("InferenceService", "mnist-cnn-onnx-triton", ("spec", "predictor"), ("scaleMetric", "gpu"),
     r"'gpu' is not one of \['cpu', 'memory', 'concurrency', 'rps'\]"),
    ("InferenceService", "mnist-onnx-serve", ("spec", "predictor"), ("replicas", 3),
     r"predictor: Additional properties are not allowed \('replicas' was unexpected\)"),
    ("InferenceService", "mnist-onnx-serve", ("spec", "predictor", "containers", 0, "securityContext"),
     ("readOnlyRootFilesystem", "yes"), "'yes' is not of type 'boolean'"),
], ids=["misspelled-probe", "port-as-string", "hpa-replicas", "service-type", "kserve-model-format",
        "kserve-scale-metric", "kserve-unknown-field", "kserve-wrong-type"])
def test_a_wrong_field_fails_validation(kind, name, where, wrong, expected):
    doc = find(kind, name)
    assert not problems(doc)
    node = doc
    for key in where:
        node = node[key]
    node[wrong[0]] = wrong[1]
    found = problems(doc)
    assert any(re.search(expected, p) for p in found), found


def test_the_kserve_crd_is_the_pinned_release_of_kserves_own():
    assert kserve_validator() is not None  # checks the SHA-256 of the decompressed file
    assert hashlib.sha256(gzip.decompress(KSERVE_CRD.read_bytes())).hexdigest() == KSERVE_CRD_SHA256


def containerfile() -> dict[str, Any]:
    """What the Containerfile says that deploy/ must agree with."""
    text = (REPO / "Containerfile").read_text()
    user, group = re.search(r"^USER (\d+):(\d+)$", text, re.M).groups()  # type: ignore[union-attr]
    copied = re.search(r"^COPY (pipeline/.*?) /app/pipeline/$", text, re.M | re.S)[1]  # type: ignore[index]
    return {"user": int(user), "group": int(group),
            "expose": [int(p) for p in re.findall(r"^EXPOSE (\d+)$", text, re.M)],
            "entrypoint": json.loads(re.search(r"^ENTRYPOINT (\[.*\])$", text, re.M)[1]),  # type: ignore[index]
            "pipeline": sorted(re.findall(r"pipeline/(\w+)\.py", copied))}


def test_the_image_copies_exactly_the_pipeline_modules_the_service_imports():
    needed = set().union(*(closure(m) for m in closure("serving.__main__") | closure("serving.server")))
    assert containerfile()["pipeline"] == sorted({"__init__"} | {m.split(".")[1] for m in needed
                                                                   if m.startswith("pipeline.")})


def test_the_image_runs_the_deployable_on_every_interface_of_the_exposed_port():
    image = containerfile()
    assert image["entrypoint"][:3] == ["python", "-m", "serving"]
    args = command_line("serving", None, str(contract.DEFAULT_MODEL)).parse_args(image["entrypoint"][3:])
    assert (args.host, args.port, args.model) == ("0.0.0.0", image["expose"][0], "/models/model.onnx")
    assert image["expose"] == [8000]


def serving_containers() -> list[tuple[dict, dict]]:
    """(pod spec, container) of every manifest that runs our image."""
    pods = [find("Deployment", "mnist-onnx-serve")["spec"]["template"]["spec"],
            find("InferenceService", "mnist-onnx-serve")["spec"]["predictor"]]
    return [(pod, c) for pod in pods for c in pod["containers"]]


@pytest.mark.parametrize("index", [0, 1], ids=["deployment", "kserve-custom"])
def test_the_manifests_run_our_image_as_the_image_and_the_code_expect(index):
    pod, c = serving_containers()[index]
    image = containerfile()
    image_sh = (REPO / "scripts" / "image.sh").read_text()
    assert c["image"] == re.search(r"^tag=(\S+)$", image_sh, re.M)[1]  # type: ignore[index]
    (port,) = c["ports"]
    assert port["containerPort"] == image["expose"][0]
    routes = set(re.findall(r'Route\("(/v2/health/\w+)"', (REPO / "serving" / "server.py").read_text()))
    for probe, path in HEALTH.items():
        assert c[probe]["httpGet"]["path"] == path and path in routes
        assert c[probe]["httpGet"]["port"] in (port["containerPort"], port.get("name"))
    # the user the image runs as, and nothing it does not need
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert (pod["securityContext"]["runAsUser"], pod["securityContext"]["runAsGroup"]) == (image["user"],
                                                                                          image["group"])
    assert c["securityContext"] == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                    "capabilities": {"drop": ["ALL"]}}
    # SIGTERM comes after preStop; the kubelet's SIGKILL must come after the service's own grace period
    grace = max(ServeConfig().shutdown_grace_s,
                params.parse(ServeConfig, params.read_file(REPO / "params.yaml")["serve"], "serve").shutdown_grace_s)
    assert pod["terminationGracePeriodSeconds"] > c["lifecycle"]["preStop"]["sleep"]["seconds"] + grace
    # the flags appended to the image's command line are real ones: one onnxruntime thread per CPU of the limit
    limit = c["resources"]["limits"]["cpu"]
    env = {e["name"]: e["valueFrom"]["resourceFieldRef"] for e in c["env"]}
    args = [re.sub(r"\$\((\w+)\)", lambda m: limit if env[m[1]]["resource"] == "limits.cpu" else "?", a)
            for a in c["args"]]
    parsed = command_line("serving", None, str(contract.DEFAULT_MODEL)).parse_args(image["entrypoint"][3:] + args)
    assert parsed.threads == int(limit) and parsed.port == port["containerPort"]
    assert parsed.name is None  # served as registry.model_name, the name Triton gives it too


def test_the_service_and_the_autoscaler_point_at_the_deployment():
    deployment, service = find("Deployment", "mnist-onnx-serve"), find("Service", "mnist-onnx-serve")
    hpa = find("HorizontalPodAutoscaler", "mnist-onnx-serve")
    pod = deployment["spec"]["template"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    (container,) = pod["spec"]["containers"]
    assert [p["targetPort"] for p in service["spec"]["ports"]] == [p["name"] for p in container["ports"]]
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(container["ports"][0]["containerPort"])
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == ("apps/v1", "Deployment",
                                                                      deployment["metadata"]["name"])
    assert hpa["spec"]["minReplicas"] <= deployment["spec"]["replicas"] <= hpa["spec"]["maxReplicas"]


def test_kserve_serves_the_triton_repository_with_its_triton_runtime():
    model = find("InferenceService", "mnist-cnn-onnx-triton")["spec"]["predictor"]["model"]
    assert model["modelFormat"] == {"name": "onnx"} and model["protocolVersion"] == "v2"
    assert model["runtime"] == "kserve-tritonserver"
    # the folder the triton stage writes (dvc.yaml), which Triton serves under registry.model_name
    assert "--out models/triton" in (REPO / "dvc.yaml").read_text() and model["storageUri"].endswith("/triton")
    assert params.read_file(REPO / "params.yaml")["registry"]["model_name"] == contract.RegistryConfig.model_name


def test_the_strict_check_keeps_fields_a_crd_leaves_open():
    schema = strict({"type": "object", "properties": {"a": {"type": "object", "properties": {"b": {}},
                                                             "x-kubernetes-preserve-unknown-fields": True}}})
    validator = jsonschema.Draft202012Validator(schema)
    assert validator.is_valid({"a": {"b": 1, "c": 2}})  # preserved unknown fields are allowed
    assert not validator.is_valid({"a": {}, "z": 1})  # elsewhere they are not


def test_manifests_are_found_in_every_yaml_file_under_deploy():
    files = {Path(name.split(":")[0]) for name, _ in MANIFESTS}
    assert files == {p.relative_to(REPO) for p in (REPO / "deploy").rglob("*.yaml")}
