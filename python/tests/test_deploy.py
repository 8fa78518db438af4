"""deploy/ checked two ways.

Static: systemd-analyze on the unit, hadolint on the Containerfile, the Kubernetes schemas
(kubernetes-validate) on the manifests. No image is built: there is no container engine here.

Live: each artifact's daemon is started as the artifact ships it. The unit's ExecStart and
Environment with the host config it installs; the image's ENTRYPOINT/CMD, ENV and copied
files; the Deployment's and the DaemonSet's args and env on top of the image, with the
ConfigMap and the Secret materialised as files where they are mounted. Only two things are
rewritten: listen addresses (to 127.0.0.1 and a free port: nothing may bind 0.0.0.0 here) and
absolute paths (the built binaries target/debug/tfsd and tfsd-worker, the repository's
libtensorflow, everything else into a temporary root). Because loopback needs no
credentials, every artifact's *shipped* addresses and credentials also go through
`tfsd check-config`, which applies the same exposure check as `serve`: an artifact that
binds 0.0.0.0 without credentials fails here although its loopback copy would start. Then
the test waits for "tfsd listening on", runs the health check the artifact's probes run
(kubelet's gRPC probes and the image's HEALTHCHECK through `tfsd health`, the unit's watchdog
through a NOTIFY_SOCKET), checks the token requirement and the metrics endpoint, and stops
the daemon with SIGTERM, expecting exit 0.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import select
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
import tomllib
import urllib.request
from pathlib import Path

import grpc
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
VENV_BIN = Path(sys.executable).parent
TFSD = ROOT / "target" / "debug" / "tfsd"
TFSD_WORKER = ROOT / "target" / "debug" / "tfsd-worker"
LIBTENSORFLOW = ROOT / ".cache" / "libtensorflow" / "lib"

# Starting (a worker loads TensorFlow), a health check turning SERVING, stopping.
DEADLINE_S = 60.0

# Where the artifacts put things, and what stands for them here.
INSTALLED_BINARIES = {
    "/usr/local/bin/tfsd": TFSD,
    "/usr/local/bin/tfsd-worker": TFSD_WORKER,
}
INSTALLED_LIBTENSORFLOW = "/opt/libtensorflow/lib"
# The unit's header: "deploy/tfsd.toml as /etc/tfsd/tfsd.toml".
HOST_CONFIG = ("/etc/tfsd/tfsd.toml", DEPLOY / "tfsd.toml")
# What an operator provides to the image at run time (deploy/README.md).
CONTAINER_TOKEN_FILE = "/run/secrets/tfsd-token"

# Which environment variable moves which endpoint (config.rs ENV_OVERRIDES).
# Straight to the daemon, whatever proxy the environment names.
CHANNEL_OPTIONS = [("grpc.enable_http_proxy", 0)]

ENDPOINTS = {
    "server": "TFSD_LISTEN",
    "metrics": "TFSD_METRICS_LISTEN",
    "master": "TFSD_MASTER_LISTEN",
}


@pytest.fixture(scope="module", autouse=True)
def built_binaries():
    for binary in (TFSD, TFSD_WORKER):
        assert binary.is_file(), f"{binary} is missing: cargo build -p tfsd --bins -p tfsd-worker"


# ---------------------------------------------------------------------------------------------
# Reading the artifacts.


def containerfile() -> dict:
    """The run stage of deploy/Containerfile: ENV, ENTRYPOINT, CMD, HEALTHCHECK, EXPOSE, USER
    and the files it copies from the build context."""
    lines, current = [], ""
    for raw in (DEPLOY / "Containerfile").read_text().splitlines():
        if raw.lstrip().startswith("#"):
            continue  # comments, also inside continued instructions
        if raw.endswith("\\"):
            current += raw[:-1] + " "
            continue
        current += raw
        if current.strip():
            lines.append(current.strip())
        current = ""
    stages, stage = [], None
    for line in lines:
        instruction, _, rest = line.partition(" ")
        instruction = instruction.upper()
        if instruction == "FROM":
            stage = {"env": {}, "copies": [], "expose": [], "entrypoint": [], "cmd": []}
            stages.append(stage)
        elif instruction == "ENV":
            words = shlex.split(rest)
            if all("=" in word for word in words):
                stage["env"].update(word.split("=", 1) for word in words)
            else:  # legacy `ENV KEY VALUE`
                stage["env"][words[0]] = " ".join(words[1:])
        elif instruction == "COPY":
            words = rest.split()
            if not any(word.startswith("--from=") for word in words):
                *sources, destination = [w for w in words if not w.startswith("--")]
                stage["copies"].extend((source, destination) for source in sources)
        elif instruction in ("ENTRYPOINT", "CMD"):
            assert rest.startswith("["), f"{instruction} must use the exec (JSON) form: {line}"
            stage[instruction.lower()] = json.loads(rest)
        elif instruction == "HEALTHCHECK":
            _, _, command = rest.partition(" CMD ")
            assert command.startswith("["), f"HEALTHCHECK CMD must use the exec form: {line}"
            stage["healthcheck"] = json.loads(command)
        elif instruction == "EXPOSE":
            stage["expose"].extend(int(port.split("/")[0]) for port in rest.split())
        elif instruction == "USER":
            stage["user"] = rest
    return stages[-1]


def unit_service_section() -> dict[str, list[str]]:
    """deploy/tfsd.service's [Service] section: every value of every key, in order."""
    section, values = None, {}
    for line in (DEPLOY / "tfsd.service").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line
            continue
        if section == "[Service]":
            key, _, value = line.partition("=")
            values.setdefault(key.strip(), []).append(value.strip())
    return values


def manifests() -> list[Path]:
    return sorted(p for p in KUBERNETES.glob("*.yaml") if p.name != "kustomization.yaml")


def kubernetes_objects() -> dict[tuple[str, str], dict]:
    objects = {}
    for path in manifests():
        for document in yaml.safe_load_all(path.read_text()):
            if document:
                objects[(document["kind"], document["metadata"]["name"])] = document
    return objects


def systemd_seconds(text: str) -> float:
    units = {"ms": 0.001, "s": 1, "sec": 1, "min": 60, "m": 60, "h": 3600}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", text):
        total += float(number) * units[unit or "s"]
    return total


# ---------------------------------------------------------------------------------------------
# A temporary root standing in for the machine, container or pod.


class Sandbox:
    """Maps the artifacts' absolute paths: the installed binaries to the built ones,
    libtensorflow to the repository's, everything else under `root`."""

    def __init__(self, root: Path):
        self.root = root

    def path(self, path: str) -> str:
        assert path.startswith("/"), path
        normalized = path.rstrip("/") or "/"
        if normalized in INSTALLED_BINARIES:
            return str(INSTALLED_BINARIES[normalized])
        if normalized == INSTALLED_LIBTENSORFLOW or normalized.startswith(
            INSTALLED_LIBTENSORFLOW + "/"
        ):
            return str(LIBTENSORFLOW) + normalized[len(INSTALLED_LIBTENSORFLOW) :]
        return str(self.root / normalized.lstrip("/"))

    def value(self, value: str) -> str:
        """An environment value or argument: absolute paths (also `:`-separated lists, as in
        LD_LIBRARY_PATH) mapped, anything else as it is."""
        parts = value.split(":")
        if value.startswith("/") and all(part.startswith("/") for part in parts):
            return ":".join(self.path(part) for part in parts)
        return value

    def config_text(self, text: str) -> str:
        """A TOML file with every absolute path in a string mapped, nothing else changed."""
        return re.sub(r'"(/[^"]*)"', lambda m: json.dumps(self.path(m.group(1))), text)

    def write(self, path: str, content: str | bytes, mode: int | None = None) -> Path:
        target = Path(self.path(path))
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            target.write_bytes(content)
        else:
            target.write_text(content)
        if mode is not None:
            target.chmod(mode)
        return target

    def mount(self, mount_path: str) -> None:
        """A volume mounted at `mount_path` hides what the image has there."""
        target = Path(self.path(mount_path))
        if target.exists():
            shutil.rmtree(target)
        target.mkdir(parents=True)

    def copy_image_files(self, image: dict) -> None:
        for source, destination in image["copies"]:
            source_path = ROOT / source
            assert source_path.is_file(), f"COPY {source}: no such file in the build context"
            text = source_path.read_text()
            if destination.endswith(".toml"):
                text = self.config_text(text)
            self.write(destination, text)


def base_env() -> dict[str, str]:
    """What a service manager or container runtime gives the process besides the artifact's
    own environment: a PATH. None of the TFSD_* variables of whoever runs the tests."""
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}


def run_tfsd(args: list[str], env: dict[str, str], timeout: float = DEADLINE_S):
    return subprocess.run(
        [str(TFSD), *args], env=env, capture_output=True, text=True, timeout=timeout
    )


def config_path_of(argv: list[str]) -> str:
    assert "--config" in argv, f"the command names no config file: {argv}"
    return argv[argv.index("--config") + 1]


def check_shipped_exposure(config: str, env: dict[str, str]) -> dict:
    """`tfsd check-config` with the artifact's own addresses and credentials: the exposure
    check `serve` makes (a non-loopback listen needs credentials), nothing bound. Returns the
    resolved config."""
    result = run_tfsd(["check-config", "--json", "--config", config], env)
    assert result.returncode == 0, (
        "the daemon would refuse to start with the shipped settings:\n" + result.stderr
    )
    report = json.loads(result.stdout)
    assert report["valid"] and not report["warnings"], report
    return report


def port_of(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


def moved_endpoints(report: dict, env: dict[str, str]) -> dict[str, str]:
    """The environment with every endpoint the daemon binds moved to 127.0.0.1:0: the only
    change to the artifact's settings (0.0.0.0 may not be bound here)."""
    moved = dict(env)
    for section, variable in ENDPOINTS.items():
        if report[section]["listen"] is not None:
            moved[variable] = "127.0.0.1:0"
    return moved


# ---------------------------------------------------------------------------------------------
# The daemon.


class Daemon:
    """`argv` started as is; stdout read for the addresses it prints."""

    def __init__(self, argv: list[str], env: dict[str, str], cwd: Path, log: Path):
        self.argv = argv
        self.log = log
        self._buffer = b""
        self.addresses: dict[str, str] = {}
        with open(log, "wb") as stderr:
            self.process = subprocess.Popen(
                argv, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=stderr
            )

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")[-6000:]

    def _line(self, deadline: float) -> str | None:
        fd = self.process.stdout.fileno()
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pytest.fail(f"no 'tfsd listening on' within {DEADLINE_S} s:\n{self.stderr()}")
            ready, _, _ = select.select([fd], [], [], remaining)
            if ready:
                chunk = os.read(fd, 4096)
                if not chunk:
                    return None
                self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line.decode()

    def wait_listening(self) -> str:
        deadline = time.monotonic() + DEADLINE_S
        prefixes = {
            "tfsd metrics on ": "metrics",
            "tfsd master on ": "master",
            "tfsd socket on ": "unix_socket",
            "tfsd listening on ": "server",
        }
        while "server" not in self.addresses:
            line = self._line(deadline)
            if line is None:
                code = self.process.wait(timeout=DEADLINE_S)
                pytest.fail(
                    f"the daemon refused to start (exit {code}): {shlex.join(self.argv)}\n"
                    + self.stderr()
                )
            for prefix, endpoint in prefixes.items():
                if line.startswith(prefix):
                    self.addresses[endpoint] = line[len(prefix) :].strip()
        return self.addresses["server"]

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=DEADLINE_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            pytest.fail(f"no exit within {DEADLINE_S} s of SIGTERM:\n{self.stderr()}")

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def started():
    daemons: list[Daemon] = []

    def start(argv, env, cwd, log) -> Daemon:
        daemon = Daemon(argv, env, cwd, log)
        daemons.append(daemon)
        return daemon

    yield start
    for daemon in daemons:
        daemon.kill()


def health_request(service: str) -> bytes:
    """grpc.health.v1.HealthCheckRequest{service}, encoded by hand (no generated stubs)."""
    name = service.encode()
    assert len(name) < 128
    return (b"\x0a" + bytes([len(name)]) + name) if name else b""


def wait_serving(address: str, service: str) -> None:
    """Follows grpc.health.v1 Watch until `service` is SERVING (the warm worker is ready), as
    a probe that keeps trying would; no sleeping."""
    with grpc.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
        watch = channel.unary_stream("/grpc.health.v1.Health/Watch")
        try:
            for response in watch(health_request(service), timeout=DEADLINE_S):
                if response == b"\x08\x01":  # status: SERVING
                    return
        except grpc.RpcError as error:
            pytest.fail(f"health of {service!r} at {address}: {error}")
    pytest.fail(f"the health Watch of {service!r} at {address} ended before SERVING")


def list_sessions(address: str, token: str | None) -> grpc.StatusCode:
    metadata = [("authorization", f"Bearer {token}")] if token else None
    with grpc.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
        call = channel.unary_unary("/tfsd.v1.SessionService/ListSessions")
        try:
            call(b"", timeout=DEADLINE_S, metadata=metadata)
        except grpc.RpcError as error:
            return error.code()
    return grpc.StatusCode.OK


def token_files(config_file: Path) -> list[Path]:
    """The token files the (sandboxed) config names."""
    config = tomllib.loads(config_file.read_text())
    entries = config.get("auth", {}).get("tokens", [])
    return [config_file.parent / entry["file"] for entry in entries if "file" in entry]


def check_serves_with_tokens(daemon: Daemon, config_file: Path) -> None:
    """tfsd.v1 answers callers with a configured token and nobody else; a config without
    tokens (loopback only) answers everyone."""
    address = daemon.addresses["server"]
    tokens = [path.read_text().strip() for path in token_files(config_file)]
    if not tokens:
        assert list_sessions(address, None) == grpc.StatusCode.OK
        return
    assert list_sessions(address, None) == grpc.StatusCode.UNAUTHENTICATED
    assert list_sessions(address, "not-a-token-0123456789") == grpc.StatusCode.UNAUTHENTICATED
    for token in tokens:
        assert list_sessions(address, token) == grpc.StatusCode.OK


def check_metrics(daemon: Daemon) -> None:
    url = daemon.addresses["metrics"]  # "tfsd metrics on http://ADDRESS/metrics"
    assert url.startswith("http://127.0.0.1:") and url.endswith("/metrics"), url
    # Straight to the daemon, whatever proxy the environment names.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=DEADLINE_S) as response:
        assert response.status == 200
        assert "tfsd_" in response.read().decode()


def check_unix_socket(
    daemon: Daemon, shipped: dict, runtime_directories: list[str], sandbox: Sandbox
) -> str:
    """The shipped Unix socket: in a directory the unit makes, with the shipped mode, serving
    tfsd.v1 to `tfsd health` and to grpcio (with the authority tfsd_client sends). Returns its
    path."""
    path = shipped["server"]["unix_socket"]
    assert path is not None, "the host config serves tfsd.v1 on a Unix socket"
    assert any(
        path.startswith(sandbox.path(f"/run/{directory}") + "/") for directory in runtime_directories
    ), f"{path} is not in a RuntimeDirectory= of the unit"
    assert daemon.addresses["unix_socket"] == f"unix:{path}"
    mode = os.stat(path).st_mode
    assert stat.S_ISSOCK(mode) and f"{stat.S_IMODE(mode):04o}" == shipped["server"]["unix_socket_mode"]
    health = run_tfsd(["--address", f"unix:{path}", "health"], base_env())
    assert health.returncode == 0, health.stdout + health.stderr
    options = CHANNEL_OPTIONS + [("grpc.default_authority", "localhost")]
    with grpc.insecure_channel(f"unix:{path}", options=options) as channel:
        call = channel.unary_unary("/tfsd.v1.SessionService/ListSessions")
        call(b"", timeout=DEADLINE_S)  # no [auth] as shipped: everyone, as on loopback
    return path


def probe_command(probe: dict, ports: dict[str, int], shipped: dict, daemon: Daemon) -> list:
    """The CLI equivalent of a Kubernetes probe, aimed at where the daemon listens here."""
    if "grpc" in probe:
        port = probe["grpc"]["port"]
        port = ports[port] if isinstance(port, str) else port
        assert port == port_of(shipped["server"]["listen"]), (
            f"the gRPC probe calls port {port}, tfsd.v1 listens on {shipped['server']['listen']}"
        )
        service = probe["grpc"].get("service", "")
        return [
            str(TFSD), "--address", daemon.addresses["server"], "health", "--service", service
        ]
    pytest.fail(f"a probe this test cannot run yet (add it): {probe}")


def assert_no_python_sessions(config_file: Path) -> None:
    config = tomllib.loads(config_file.read_text())
    assert "python" not in config, "deploy configs do not ship Python sessions (deploy/README.md)"


# ---------------------------------------------------------------------------------------------
# Static checks.


def test_systemd_unit_verifies(tmp_path):
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is part of the machine image (package systemd)"
    # verify checks that ExecStart exists; point it at the built binary.
    unit = (DEPLOY / "tfsd.service").read_text()
    assert "Type=notify" in unit and "WatchdogSec=" in unit and "MemoryMax=" in unit
    unit = unit.replace("/usr/local/bin/tfsd", str(TFSD))
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
    image = containerfile()
    assert image["user"].startswith("10001") and "healthcheck" in image


def test_kubernetes_manifests_match_the_schemas():
    assert manifests()
    result = subprocess.run(
        [str(VENV_BIN / "kubernetes-validate"), "--strict", *map(str, manifests())],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_kustomization_applies_the_deployment_set():
    kustomization = yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text())
    resources = kustomization["resources"]
    for resource in resources:
        assert (KUBERNETES / resource).is_file(), resource
    # The Secret before what mounts it; the per-node DaemonSet is the alternative, not extra.
    assert resources.index("secret.yaml") < resources.index("deployment.yaml")
    assert "daemonset.yaml" not in resources


def test_shipped_placeholder_tokens_are_refused(tmp_path):
    """secret.yaml's placeholders are too short for tfsd: a cluster that applies the example
    unchanged gets a daemon that refuses to start, not one that accepts a published token."""
    objects = kubernetes_objects()
    secret = objects[("Secret", "tfsd-tokens")]
    values = secret.get("stringData", {})
    assert values and all(len(value) < 16 for value in values.values()), values
    sandbox = Sandbox(tmp_path / "root")
    config = objects[("ConfigMap", "tfsd-config")]["data"]["tfsd.toml"]
    config_file = sandbox.write("/etc/tfsd/tfsd.toml", sandbox.config_text(config))
    for key, value in values.items():
        sandbox.write(f"/etc/tfsd-tokens/{key}", value)
    result = run_tfsd(["check-config", "--config", str(config_file)], base_env())
    assert result.returncode != 0
    assert "shorter than 16 characters" in result.stderr, result.stderr


def test_the_image_refuses_to_start_without_its_token(tmp_path):
    image = containerfile()
    sandbox = Sandbox(tmp_path / "root")
    sandbox.copy_image_files(image)
    env = base_env() | {k: sandbox.value(v) for k, v in image["env"].items()}
    argv = [sandbox.value(word) for word in image["entrypoint"] + image["cmd"]]
    result = run_tfsd(["check-config", "--config", config_path_of(argv)], env)
    assert result.returncode != 0
    assert CONTAINER_TOKEN_FILE.lstrip("/") in result.stderr, result.stderr


def test_host_config_leaves_loopback_only_with_its_tokens(tmp_path):
    """deploy/README.md's way off loopback for a host: TFSD_LISTEN in a drop-in, the tokens
    as systemd credentials, the config's commented [[auth.tokens]] entries uncommented."""
    installed, source = HOST_CONFIG
    sandbox = Sandbox(tmp_path / "root")
    env = base_env() | {"TFSD_LISTEN": "0.0.0.0:50051"}
    shipped = sandbox.write(installed, sandbox.config_text(source.read_text()))
    result = run_tfsd(["check-config", "--config", str(shipped)], env)
    assert result.returncode != 0 and "not a loopback address" in result.stderr

    lines, in_tokens = [], False
    for line in source.read_text().splitlines():
        if line.startswith("# [[auth.tokens]]"):
            in_tokens = True
        elif not line.startswith("# "):
            in_tokens = False
        lines.append(line[2:] if in_tokens else line)
    with_tokens = sandbox.write(installed, sandbox.config_text("\n".join(lines) + "\n"))
    files = token_files(with_tokens)
    assert files and all("/run/credentials/tfsd.service/" in str(path) for path in files)
    for path in files:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(secrets.token_hex(32) + "\n")
        # As systemd hands credentials over: readable by the service's user alone (tfsd
        # refuses a token file group or others could read).
        path.chmod(0o400)
    check_shipped_exposure(str(with_tokens), env)


# ---------------------------------------------------------------------------------------------
# Each artifact, started as shipped.


def test_systemd_unit_starts_as_shipped(tmp_path, started):
    service = unit_service_section()
    assert service["Type"] == ["notify"]
    (exec_start,) = service["ExecStart"]
    assert not exec_start.startswith(("-", "@", "+", "!", ":")), exec_start
    sandbox = Sandbox(tmp_path / "root")
    argv = [sandbox.value(word) for word in shlex.split(exec_start)]
    assert argv[0] == str(TFSD)

    unit_text = (DEPLOY / "tfsd.service").read_text()
    installed, source = HOST_CONFIG
    assert f"{source.relative_to(ROOT)} as {installed}" in " ".join(unit_text.split())
    assert config_path_of(argv) == sandbox.path(installed)
    config_file = sandbox.write(installed, sandbox.config_text(source.read_text()))
    assert_no_python_sessions(config_file)
    for directory in service.get("StateDirectory", []):
        Path(sandbox.path(f"/var/lib/{directory}")).mkdir(parents=True)
    runtime_directories = service.get("RuntimeDirectory", [])
    for directory in runtime_directories:
        Path(sandbox.path(f"/run/{directory}")).mkdir(parents=True)

    env = base_env()
    for assignments in service.get("Environment", []):
        for assignment in shlex.split(assignments):
            key, _, value = assignment.partition("=")
            env[key] = sandbox.value(value)
    shipped = check_shipped_exposure(str(config_file), env)

    # systemd's side of Type=notify and the watchdog.
    notify_path = tmp_path / "notify"
    notifications = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notifications.bind(str(notify_path))
    (watchdog,) = service["WatchdogSec"]
    env = moved_endpoints(shipped, env) | {
        "NOTIFY_SOCKET": str(notify_path),
        "WATCHDOG_USEC": str(int(systemd_seconds(watchdog) * 1_000_000)),
    }

    def expect(message: str) -> None:
        deadline = time.monotonic() + DEADLINE_S
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pytest.fail(f"no {message} on NOTIFY_SOCKET:\n{daemon.stderr()}")
            notifications.settimeout(remaining)
            try:
                datagram = notifications.recv(4096).decode()
            except TimeoutError:
                continue
            if message in datagram.splitlines():
                return

    with notifications:
        daemon = started(argv, env, sandbox.root, tmp_path / "stderr")
        daemon.wait_listening()
        expect("READY=1")
        expect("WATCHDOG=1")
        # The unit has no probe of its own beyond the watchdog; `tfsd health` is what an
        # operator runs on the host.
        wait_serving(daemon.addresses["server"], "tfsd.v1.SessionService")
        health = run_tfsd(["--address", daemon.addresses["server"], "health"], base_env())
        assert health.returncode == 0, health.stdout + health.stderr
        check_serves_with_tokens(daemon, config_file)
        check_metrics(daemon)
        assert "master" in daemon.addresses  # tf.compat.v1.Session on this host
        socket_path = check_unix_socket(daemon, shipped, runtime_directories, sandbox)
        assert daemon.stop() == 0, daemon.stderr()
        expect("STOPPING=1")
        assert not Path(socket_path).exists(), "the socket is removed when tfsd stops"


def test_container_image_starts_as_shipped(tmp_path, started):
    image = containerfile()
    sandbox = Sandbox(tmp_path / "root")
    sandbox.copy_image_files(image)
    # What `podman run --secret tfsd-token` (or the bind mount deploy/README.md shows) adds.
    token_file = sandbox.write(CONTAINER_TOKEN_FILE, secrets.token_hex(32) + "\n", 0o400)
    env = base_env() | {key: sandbox.value(value) for key, value in image["env"].items()}
    argv = [sandbox.value(word) for word in image["entrypoint"] + image["cmd"]]
    assert argv[0] == str(TFSD) and argv[1] == "serve"
    config_file = Path(config_path_of(argv))
    assert_no_python_sessions(config_file)
    shipped = check_shipped_exposure(str(config_file), env)
    assert token_file in token_files(config_file)
    for endpoint in ("server", "metrics"):
        assert port_of(shipped[endpoint]["listen"]) in image["expose"], shipped[endpoint]
    daemon = started(argv, moved_endpoints(shipped, env), sandbox.root, tmp_path / "stderr")
    daemon.wait_listening()
    wait_serving(daemon.addresses["server"], "tfsd.v1.SessionService")

    # HEALTHCHECK, run as the image declares it, aimed at where the daemon listens here.
    healthcheck = [sandbox.value(word) for word in image["healthcheck"]]
    assert healthcheck[0] == str(TFSD)
    address_index = healthcheck.index("--address") + 1
    declared = healthcheck[address_index]
    assert port_of(declared) == port_of(shipped["server"]["listen"]), declared
    assert declared.startswith("127.0.0.1:"), "the check runs inside the container"
    healthcheck[address_index] = daemon.addresses["server"]
    health = subprocess.run(healthcheck, env=env, capture_output=True, text=True)
    assert health.returncode == 0, health.stdout + health.stderr

    check_serves_with_tokens(daemon, config_file)
    check_metrics(daemon)
    assert daemon.stop() == 0, daemon.stderr()


def pod_can_read(pod: dict, path: Path, mode: int) -> bool:
    """Whether the pod's user reads a Secret or ConfigMap file: the kubelet makes them
    root-owned, group fsGroup when the pod sets one."""
    context = pod.get("securityContext", {})
    if context.get("runAsUser", 0) == 0 or mode & 0o004:
        return True
    return bool(context.get("fsGroup") is not None and mode & 0o040)


@pytest.mark.parametrize("manifest", ["deployment.yaml", "daemonset.yaml"])
def test_kubernetes_workload_starts_as_shipped(manifest, tmp_path, started):
    objects = kubernetes_objects()
    workload = yaml.safe_load((KUBERNETES / manifest).read_text())
    template = workload["spec"]["template"]
    pod = template["spec"]
    (container,) = pod["containers"]
    assert container["image"].startswith("tfsd:"), "the image deploy/Containerfile builds"
    image = containerfile()
    sandbox = Sandbox(tmp_path / "root")
    sandbox.copy_image_files(image)

    # Kubernetes' rules: `command` replaces the ENTRYPOINT (and drops CMD), `args` the CMD.
    command = container.get("command", image["entrypoint"])
    args = container.get("args", image["cmd"] if "command" not in container else [])
    argv = [sandbox.value(word) for word in command + args]
    env = base_env() | {key: sandbox.value(value) for key, value in image["env"].items()}
    for variable in container.get("env", []):
        assert "value" in variable, f"the test cannot materialise {variable} yet"
        env[variable["name"]] = sandbox.value(str(variable["value"]))

    # Volumes, as the kubelet mounts them; the Secret's placeholders replaced by real tokens,
    # as deploy/README.md says to (test_shipped_placeholder_tokens_are_refused covers them).
    volumes = {volume["name"]: volume for volume in pod.get("volumes", [])}
    for mount in container.get("volumeMounts", []):
        assert "subPath" not in mount, "the test cannot materialise subPath mounts yet"
        volume = volumes[mount["name"]]
        sandbox.mount(mount["mountPath"])
        if "configMap" in volume:
            source = objects[("ConfigMap", volume["configMap"]["name"])]
            files = {key: value for key, value in source["data"].items()}
            mode = volume["configMap"].get("defaultMode", 0o644)
        elif "secret" in volume:
            source = objects[("Secret", volume["secret"]["secretName"])]
            keys = [*source.get("stringData", {}), *source.get("data", {})]
            files = {key: secrets.token_hex(32) for key in keys}
            mode = volume["secret"].get("defaultMode", 0o644)
        else:
            pytest.fail(f"the test cannot materialise volume {volume} yet")
        for key, content in files.items():
            path = sandbox.write(
                f"{mount['mountPath']}/{key}",
                sandbox.config_text(content) if key.endswith(".toml") else content,
                mode,
            )
            assert pod_can_read(pod, path, mode), f"{path.name}: mode {mode:o} hides it from tfsd"

    config_file = Path(config_path_of(argv))
    assert config_file.is_file(), "the config the command names is not mounted"
    assert_no_python_sessions(config_file)
    shipped = check_shipped_exposure(str(config_file), env)

    # Ports: the container's, the probes', the hostPort, the scrape annotations and the
    # Service all name the ports tfsd listens on.
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports["grpc"] == port_of(shipped["server"]["listen"])
    assert ports["metrics"] == port_of(shipped["metrics"]["listen"])
    for port in container["ports"]:
        assert port.get("hostPort", port["containerPort"]) == port["containerPort"], port
    annotations = template["metadata"].get("annotations", {})
    if annotations.get("prometheus.io/scrape") == "true":
        assert int(annotations["prometheus.io/port"]) == ports["metrics"]
        assert annotations["prometheus.io/path"] == "/metrics"
    for service in (o for (kind, _), o in objects.items() if kind == "Service"):
        selector = service["spec"]["selector"]
        if all(template["metadata"]["labels"].get(k) == v for k, v in selector.items()):
            for port in service["spec"]["ports"]:
                target = port["targetPort"]
                assert target in ports or target in ports.values(), port

    daemon = started(argv, moved_endpoints(shipped, env), sandbox.root, tmp_path / "stderr")
    daemon.wait_listening()
    # kubelet retries probes until they pass (the startup probe for up to a minute); here:
    # wait for SERVING once, then every probe must pass on its first try.
    wait_serving(daemon.addresses["server"], "tfsd.v1.SessionService")
    for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert kind in container, f"{manifest}: no {kind}"
        probe = probe_command(container[kind], ports, shipped, daemon)
        result = subprocess.run(probe, env=base_env(), capture_output=True, text=True)
        assert result.returncode == 0, f"{kind}: {result.stdout}{result.stderr}"
    check_serves_with_tokens(daemon, config_file)
    check_metrics(daemon)
    assert daemon.stop() == 0, daemon.stderr()
