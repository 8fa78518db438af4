"""deploy/ checked with the tools this machine has: systemd-analyze, hadolint, and the
Kubernetes schemas (kubernetes-validate). No container is built: there is no engine here."""

import pathlib
import shutil
import subprocess
import sys

import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
VENV_BIN = pathlib.Path(sys.executable).parent


def test_systemd_unit_verifies(tmp_path):
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is part of the machine image (package systemd)"
    binary = ROOT / "target" / "debug" / "tfsd"
    assert binary.exists(), "build first: cargo build --workspace"
    # verify checks that ExecStart exists; point it at the built binary.
    unit = (DEPLOY / "tfsd.service").read_text()
    assert "Type=notify" in unit and "WatchdogSec=" in unit and "MemoryMax=" in unit
    unit = unit.replace("/usr/local/bin/tfsd", str(binary))
    (tmp_path / "tfsd.service").write_text(unit)
    result = subprocess.run(
        [analyze, "verify", str(tmp_path / "tfsd.service")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    # verify also prints warnings for unknown or misspelt directives.
    assert "Unknown" not in result.stderr, result.stderr


def test_containerfile_passes_hadolint():
    hadolint = VENV_BIN / "hadolint"
    result = subprocess.run(
        [str(hadolint), "--failure-threshold", "warning", str(DEPLOY / "Containerfile")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    text = (DEPLOY / "Containerfile").read_text()
    assert "USER 10001" in text and "HEALTHCHECK" in text


def test_kubernetes_manifests_match_the_schemas():
    manifests = sorted((DEPLOY / "kubernetes").glob("*.yaml"))
    assert manifests
    result = subprocess.run(
        [str(VENV_BIN / "kubernetes-validate"), "--strict", *map(str, manifests)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_probes_and_config_fit_the_daemon():
    deployment = yaml.safe_load((DEPLOY / "kubernetes" / "deployment.yaml").read_text())
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["readinessProbe"]["grpc"]["service"] == "tfsd.v1.SessionService"
    assert container["livenessProbe"]["grpc"]["port"] == 50051
    config = yaml.safe_load((DEPLOY / "kubernetes" / "configmap.yaml").read_text())
    # The ConfigMap's TOML must be a config tfsd accepts.
    toml_path = pathlib.Path(ROOT / "target" / "configmap-tfsd.toml")
    toml_path.write_text(config["data"]["tfsd.toml"])
    result = subprocess.run(
        [str(ROOT / "target" / "debug" / "tfsd"), "check-config", "--config", str(toml_path)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
