"""The Kubernetes and KServe manifests, validated offline: core kinds against Kubernetes' own
schemas (kubernetes-validate, strict), the InferenceService against KServe's CRD, and every probe,
port and environment variable against what the app really serves and reads."""

from __future__ import annotations

from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from app.main import create_app
from app.settings import Settings
from tests.test_packaging import image_env

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
KUBERNETES_VERSION = "1.31.0"
CRD = ROOT.parent / "shared" / "schemas" / "kserve-inferenceservices-crd.yaml"
#: Variables that are KServe's conventions, not settings of this app.
CONVENTIONS = {"PORT", "PROTOCOL", "STORAGE_URI"}
#: The topology is derived from the pod's CPUs: manifests must not pin it.
TOPOLOGY = {"PROCESSES", "INFERENCE_WORKERS", "INFERENCE_THREADS", "DECODE_THREADS"}


def documents(folder: str) -> list[dict]:
    docs = []
    for path in sorted((DEPLOY / folder).glob("*.yaml")):
        docs += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    return docs


def containers(doc: dict) -> list[dict]:
    spec = doc["spec"]
    if doc["kind"] == "InferenceService":
        return spec["predictor"]["containers"]
    return spec["template"]["spec"]["containers"] if "template" in spec else []


def env_of(container: dict) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in container.get("env", [])}


@pytest.mark.parametrize("doc", documents("kubernetes"), ids=lambda d: d["kind"])
def test_core_manifests_are_valid_kubernetes(doc):
    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_the_kubernetes_folder_has_every_piece():
    kinds = {doc["kind"] for doc in documents("kubernetes")}
    assert kinds == {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"}
    (deployment,) = [d for d in documents("kubernetes") if d["kind"] == "Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert {m["mountPath"] for m in container["volumeMounts"]} == {"/tmp"}
    assert container["lifecycle"]["preStop"]["exec"]["command"][0] == "sleep"
    deadline = float(
        env_of(container).get("MOBILEVIT_REQUEST_TIMEOUT_S", Settings().request_timeout_s)
    )
    pause = float(container["lifecycle"]["preStop"]["exec"]["command"][1])
    assert pod["terminationGracePeriodSeconds"] > deadline + pause
    assert container["resources"]["limits"]["cpu"] and container["resources"]["requests"]["memory"]
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/path"] == "/metrics"


def test_the_inference_service_matches_kserves_crd():
    if not CRD.is_file():
        pytest.skip(f"{CRD} is not here (../shared holds KServe's CRD)")
    crd = yaml.safe_load(CRD.read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1beta1"]
    schema = version["schema"]["openAPIV3Schema"]
    (isvc,) = documents("kserve")
    jsonschema.validate(isvc, schema)
    assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "Standard"
    (container,) = containers(isvc)
    assert container["name"] == "kserve-container"
    assert env_of(container)["PROTOCOL"] == "v2"


def is_served(path: str) -> bool:
    """The app routes GET `path` (before the model loads: 200 or 503, never 404)."""
    import asyncio

    import httpx

    async def get() -> int:
        transport = httpx.ASGITransport(app=create_app(Settings()))  # runs no lifespan
        async with httpx.AsyncClient(transport=transport, base_url="http://pod") as client:
            return (await client.get(path)).status_code

    return asyncio.run(get()) != 404


@pytest.mark.parametrize("doc", [d for d in documents("kubernetes") + documents("kserve")
                                 if containers(d)], ids=lambda d: d["kind"])  # fmt: skip
def test_probes_ports_and_environment_are_the_apps(doc, monkeypatch):
    for container in containers(doc):
        env = env_of(container)
        for name in env:
            if name in CONVENTIONS:
                continue
            assert name.startswith("MOBILEVIT_"), name
            field = name.removeprefix("MOBILEVIT_").lower()
            assert field in Settings.model_fields, f"{name} is not a setting"
            assert field.upper() not in TOPOLOGY, f"{name} pins what the pod's CPUs decide"
        # The image's own ENV first, then the container's: neither may shadow the other's intent.
        image = image_env()
        for key, value in {**image, **env}.items():
            monkeypatch.setenv(key, value)
        settings = Settings()
        if "STORAGE_URI" in env:
            assert settings.model_dir == Path("/mnt/models")
        ports = {p["containerPort"] for p in container["ports"]}
        names = {p.get("name"): p["containerPort"] for p in container["ports"]}
        assert ports == {settings.port}, (ports, settings.port)
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            if probe not in container:
                continue
            get = container[probe]["httpGet"]
            assert is_served(get["path"]), get["path"]
            assert names.get(get["port"], get["port"]) == settings.port
        for key in {**image, **env}:
            monkeypatch.delenv(key)


def test_storage_uri_points_the_model_dir_at_kserves_mount(monkeypatch):
    monkeypatch.delenv("MOBILEVIT_MODEL_DIR", raising=False)
    for key, value in image_env().items():  # as in the image
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("STORAGE_URI", "gs://bucket/model")
    assert Settings().model_dir == Path("/mnt/models")
    monkeypatch.setenv("MOBILEVIT_MODEL_DIR", "/srv/models/other")
    assert Settings().model_dir == Path("/srv/models/other")
