"""deploy/: the Kubernetes manifests validate against the Kubernetes schemas (offline, bundled
with kubernetes-validate) and fit together (selectors, probes, config mount, GPU requests); the
ConfigMap's TOML is a valid pipeserve config; the Dockerfiles are multi-stage, run as a non-root
user, check health over gRPC and start pipeserve-server; the health-check script they run
answers 0 only for a SERVING server. Images are not built here (no registry access)."""
from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from ops_testing import free_port

yaml = pytest.importorskip("yaml")
kubernetes_validate = pytest.importorskip("kubernetes_validate")

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S_VERSION = "1.30.0"  # the oldest Kubernetes these manifests target (native gRPC probes, sleep preStop)


def _documents() -> list[tuple[str, dict]]:
    out = []
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        out += [(path.name, doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return out


DOCS = _documents()


def _kind(kind: str) -> list[dict]:
    return [doc for _, doc in DOCS if doc["kind"] == kind]


def _deployment(variant: str) -> dict:
    [doc] = [d for d in _kind("Deployment") if d["metadata"]["name"] == f"pipeserve-{variant}"]
    return doc


@pytest.mark.parametrize("version", [K8S_VERSION, kubernetes_validate.latest_version()])
@pytest.mark.parametrize("name,doc", DOCS, ids=[f"{n}:{d['kind']}:{d['metadata']['name']}" for n, d in DOCS])
def test_manifest_validates_against_the_kubernetes_schema(name, doc, version):
    kubernetes_validate.validate(doc, version, strict=True)


def test_the_validator_rejects_broken_manifests():
    """A control: the schemas are really applied (a typo or a wrong type fails)."""
    broken = copy.deepcopy(_deployment("cpu"))
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"]["port"] = "grpc"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)
    typo = copy.deepcopy(_deployment("cpu"))
    typo["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(typo, K8S_VERSION, strict=True)


def test_every_piece_is_there():
    kinds = {doc["kind"] for _, doc in DOCS}
    assert kinds >= {"ConfigMap", "Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget",
                     "PersistentVolumeClaim"}
    assert {d["metadata"]["name"] for d in _kind("Deployment")} == {"pipeserve-cpu", "pipeserve-cuda"}


@pytest.mark.parametrize("variant", ["cpu", "cuda"])
def test_deployment_probes_config_and_security(variant):
    deployment = _deployment(variant)
    pod = deployment["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    spec = pod["spec"]
    [container] = spec["containers"]
    grpc_port = next(p["containerPort"] for p in container["ports"] if p["name"] == "grpc")
    # Native gRPC probes on grpc.health.v1: the process for liveness/startup, the preloaded
    # task's service for readiness.
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["grpc"]["port"] == grpc_port, probe
    assert container["livenessProbe"]["grpc"]["service"] == ""
    assert container["readinessProbe"]["grpc"]["service"] == "pipeserve.v1.ImageClassificationService"
    # Non-root, read-only, no privilege escalation.
    assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] != 0
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    # The config file the server reads is the ConfigMap's, at the mounted path.
    env = {e["name"]: e.get("value") for e in container["env"]}
    config_path = Path(env["PIPESERVE_CONFIG"])
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    config_volume = next(name for name, v in volumes.items() if "configMap" in v)
    assert mounts[config_volume]["mountPath"] == str(config_path.parent)
    [configmap] = _kind("ConfigMap")
    assert volumes[config_volume]["configMap"]["name"] == configmap["metadata"]["name"]
    assert config_path.name in configmap["data"]
    assert mounts["models"]["mountPath"] == "/models" and mounts["models"]["readOnly"] is True
    # Mount points must not nest inside another (read-only) volume.
    paths = [m["mountPath"] for m in container["volumeMounts"]]
    assert not [(a, b) for a in paths for b in paths if a != b and b.startswith(a.rstrip("/") + "/")]
    # The drain finishes before the kubelet's SIGKILL.
    grace = tomllib.loads(configmap["data"]["config.toml"])["grace_period_s"]
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert spec["terminationGracePeriodSeconds"] > grace + pre_stop
    gpus = container["resources"].get("limits", {}).get("nvidia.com/gpu")
    if variant == "cuda":
        assert gpus == "1" and container["resources"]["requests"]["nvidia.com/gpu"] == "1"
        assert env["PIPESERVE_DEVICE"] == "cuda"
        assert any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"])
    else:
        assert gpus is None


def test_service_is_headless_and_selects_the_pods():
    [service] = _kind("Service")
    assert service["spec"]["clusterIP"] == "None"
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert ports["grpc"]["port"] == 50051
    for variant in ("cpu", "cuda"):
        labels = _deployment(variant)["spec"]["template"]["metadata"]["labels"]
        assert service["spec"]["selector"].items() <= labels.items()


def test_hpa_and_pdb_target_the_deployments():
    names = {d["metadata"]["name"] for d in _kind("Deployment")}
    hpas = _kind("HorizontalPodAutoscaler")
    assert {h["spec"]["scaleTargetRef"]["name"] for h in hpas} == names
    for hpa in hpas:
        assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    for pdb in _kind("PodDisruptionBudget"):
        selector = pdb["spec"]["selector"]["matchLabels"]
        matching = [d for d in _kind("Deployment")
                    if selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()]
        assert len(matching) == 1, pdb["metadata"]["name"]


def test_configmap_toml_is_a_valid_pipeserve_config(tmp_path, monkeypatch):
    from pipeserve import devices
    from pipeserve.config import load_settings

    # Settings check devices against the machine's: read the CUDA variant as a GPU node would.
    monkeypatch.setattr(devices, "available_devices", lambda: ["cpu", "cuda:0", "auto"])

    [configmap] = _kind("ConfigMap")
    path = tmp_path / "config.toml"
    path.write_text(configmap["data"]["config.toml"])
    settings = load_settings(["--config", str(path)], environ={})
    assert settings.listen == "0.0.0.0:50051" and settings.metrics_listen == "0.0.0.0:9090"
    assert settings.log_format == "json" and settings.hub_offline
    assert "image-classification" in settings.preload
    assert settings.preload["image-classification"].model.startswith("/models/")
    # The CUDA Deployment's environment overrides the same file.
    env = {e["name"]: e["value"] for e in _deployment("cuda")["spec"]["template"]["spec"]["containers"][0]["env"]}
    cuda = load_settings(["--config", str(path)], environ={k: v for k, v in env.items() if k.startswith("PIPESERVE_")
                                                           and k != "PIPESERVE_CONFIG"})
    assert cuda.device == "cuda" and cuda.dtype == "float16"


# ---- Dockerfiles --------------------------------------------------------------------------------
def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.cuda"])
def test_dockerfile_structure(name):
    steps = _instructions(DEPLOY / name)
    stages = [i for i, (word, _) in enumerate(steps) if word == "FROM"]
    assert len(stages) >= 2, "multi-stage build"
    final = steps[stages[-1]:]
    assert any(word == "COPY" and args.startswith("--from=build") for word, args in final)
    users = [args for word, args in final if word == "USER"]
    assert users, "the runtime stage sets a USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), user
    [healthcheck] = [args for word, args in final if word == "HEALTHCHECK"]
    assert "CMD" in healthcheck and "pipeserve-healthcheck" in healthcheck
    [entrypoint] = [args for word, args in final if word == "ENTRYPOINT"]
    assert "pipeserve-server" in entrypoint
    assert any(word == "EXPOSE" and "50051" in args for word, args in final)
    # Files the build copies exist in the build context (the repository root).
    for word, args in steps:
        if word == "COPY" and not args.startswith("--from"):
            sources = [a for a in args.split() if not a.startswith("--")][:-1]
            for source in sources:
                source = source.replace("${MODELS_SRC}", "deploy/models")
                assert (ROOT / source.rstrip("/")).exists(), source
    # Models are mounted or baked at /models; torch never comes from a bare `pip install torch`.
    assert any(word == "COPY" and "/models/" in args for word, args in final)
    assert all("torch==" in args for word, args in steps if word == "RUN" and " torch" in args.replace('"', " "))
    if name.endswith("cuda"):
        assert any("PIPESERVE_DEVICE=cuda" in args for word, args in final if word == "ENV")


def test_the_entrypoint_is_a_console_script():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["pipeserve-server"] == "pipeserve.server:main"


def _healthcheck(env: dict[str, str]) -> subprocess.CompletedProcess:
    environ = dict(os.environ, **env)
    environ["PYTHONPATH"] = os.pathsep.join([str(ROOT / "service"), environ.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, str(DEPLOY / "healthcheck.py")], env=environ, capture_output=True,
                          text=True, timeout=60)


def test_healthcheck_script_against_a_live_server():
    from grpc_testing import make_server

    server = make_server()  # its own: no other test loads a fill-mask model into it
    try:
        _check_health_script(server.running.port)
    finally:
        server.stop()


def _check_health_script(port: int) -> None:
    ok = _healthcheck({"PIPESERVE_LISTEN": f"0.0.0.0:{port}"})
    assert ok.returncode == 0 and ok.stdout.strip() == "SERVING", ok
    # A task service without a model is NOT_SERVING: unhealthy for a check that names it.
    cold = _healthcheck({"PIPESERVE_LISTEN": f"0.0.0.0:{port}",
                         "PIPESERVE_HEALTHCHECK_SERVICE": "pipeserve.v1.FillMaskService"})
    assert cold.returncode == 1 and cold.stdout.strip() == "NOT_SERVING", cold
    down = _healthcheck({"PIPESERVE_LISTEN": f"0.0.0.0:{free_port()}"})
    assert down.returncode == 1 and "unhealthy: UNAVAILABLE" in down.stderr
