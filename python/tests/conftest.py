"""Harness for the Python tests: the real `tfsd` daemon on port 0 and a real grpcio client.

Stubs for tfsd.v1 are generated at test time from proto/tfsd/v1/tfsd.proto and the
control.proto it imports (only those files).
`tfsd_pb2` imports TensorFlow's own `tensorflow.core.framework.tensor_pb2` for
tensorflow/core/framework/tensor.proto, so the API's TensorProto *is* TensorFlow's class: tests
pass `tf.make_tensor_proto(x)` in feeds and read outputs with `tf.make_ndarray(t)`.

Environment:
  TFSD_BIN          the daemon binary (default: target/debug/tfsd in the repository root);
  TFSD_TEST_LOG     RUST_LOG for the daemon (default: warn);
  TFSD_TEST_PYTHON  the interpreter of the `python_daemon` fixture's Python sessions (default:
                    the one running the tests, i.e. .venv/bin/python: the same Python minor
                    version as the client, as cloudpickle requires).
"""

from __future__ import annotations

import atexit
import importlib
import json
import os
import queue
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import types
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
PROTO_ROOT = REPO_ROOT / "proto"
API_PROTO = "tfsd/v1/tfsd.proto"
# What tfsd.proto imports (`import public`): every tfsd.v1 message without a tensor.
CONTROL_PROTO = "tfsd/v1/control.proto"

# How long starting or stopping the daemon, or any one RPC, may take before the test fails
# instead of hanging.
DEADLINE_S = 60.0

LISTENING_PREFIX = "tfsd listening on "
MASTER_PREFIX = "tfsd master on "

# grpcio's default limits are 4 MiB received; graphs and tensors may be larger.
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", -1),
    ("grpc.max_receive_message_length", -1),
]


# ---------------------------------------------------------------------------------------------
# Stubs.


@pytest.fixture(scope="session")
def api(tmp_path_factory) -> types.SimpleNamespace:
    """The generated tfsd.v1 modules: `api.pb2` (messages) and `api.grpc` (SessionService stub).

    Only tfsd/v1/tfsd.proto is compiled. The TensorFlow protos under proto/ are a subset that
    exists for the Rust side; compiling them here would register a second, different
    tensorflow/core/framework/tensor.proto in protobuf's default descriptor pool and shadow
    TensorFlow's own `tensor_pb2`.
    """
    import grpc_tools

    out = tmp_path_factory.mktemp("tfsd_stubs")
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    # In a child process: grpc_tools' compiler (its own static libprotobuf) crashes with a
    # segmentation fault when it runs in a process that has already loaded TensorFlow, whose
    # libraries export another libprotobuf's symbols.
    command = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"--proto_path={PROTO_ROOT}",
        f"--proto_path={well_known}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        CONTROL_PROTO,
        API_PROTO,
    ]
    result = subprocess.run(
        command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=DEADLINE_S
    )
    if result.returncode != 0:
        pytest.fail(f"grpc_tools.protoc failed ({result.returncode}): {result.stderr}")

    # Import TensorFlow's TensorProto before the generated module, so the descriptor pool already
    # holds TensorFlow's tensor.proto when tfsd.proto (which depends on it) is added.
    from tensorflow.core.framework import tensor_pb2
    sys.path.insert(0, str(out))
    importlib.invalidate_caches()
    pb2 = importlib.import_module("tfsd.v1.tfsd_pb2")
    pb2_grpc = importlib.import_module("tfsd.v1.tfsd_pb2_grpc")

    # The API's TensorProto must be TensorFlow's class, not a look-alike.
    feeds_type = pb2.RunRequest.DESCRIPTOR.fields_by_name["feeds"].message_type
    tensor_descriptor = feeds_type.fields_by_name["value"].message_type
    assert tensor_descriptor is tensor_pb2.TensorProto.DESCRIPTOR, (
        "tfsd.v1 does not use TensorFlow's TensorProto"
    )
    return types.SimpleNamespace(pb2=pb2, grpc=pb2_grpc, out=out)


# ---------------------------------------------------------------------------------------------
# The daemon.


def daemon_binary() -> Path:
    binary = Path(os.environ.get("TFSD_BIN", REPO_ROOT / "target" / "debug" / "tfsd"))
    if not binary.is_absolute():
        binary = REPO_ROOT / binary
    if not os.access(binary, os.X_OK):
        pytest.fail(f"{binary} is not an executable: build it with `cargo build --workspace`")
    return binary


class Daemon:
    """A running `tfsd serve --listen 127.0.0.1:0`."""

    def __init__(self, *extra_args: str) -> None:
        env = dict(os.environ)
        env["RUST_LOG"] = os.environ.get("TFSD_TEST_LOG", "warn")
        # Free ports for the other listeners too: fixed defaults would collide between
        # daemons (and with a tfsd an operator runs on this machine).
        env["TFSD_METRICS_LISTEN"] = "127.0.0.1:0"
        env["TFSD_MASTER_LISTEN"] = "127.0.0.1:0"
        self.process = subprocess.Popen(
            [str(daemon_binary()), "serve", "--listen", "127.0.0.1:0", *extra_args],
            cwd=REPO_ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=None,  # inherited: pytest shows it with a failing test
            text=True,
        )
        self.stdout_lines: list[str] = []
        lines: queue.Queue[str | None] = queue.Queue()

        def read_stdout() -> None:
            # Keeps draining stdout for the daemon's whole life, so it never blocks on a full
            # pipe; None marks the end of the stream.
            assert self.process.stdout is not None
            for line in self.process.stdout:
                line = line.rstrip("\n")
                self.stdout_lines.append(line)
                lines.put(line)
            lines.put(None)

        threading.Thread(target=read_stdout, name="tfsd-stdout", daemon=True).start()

        deadline = time.monotonic() + DEADLINE_S
        self.address = ""
        # TensorFlow's MasterService (printed before the listening line); a TensorFlow client
        # uses f"grpc://{daemon.master_address}".
        self.master_address = ""
        while not self.address:
            remaining = deadline - time.monotonic()
            try:
                line = lines.get(timeout=max(remaining, 0.0))
            except queue.Empty:
                self.kill()
                pytest.fail(f"tfsd did not say it listens within {DEADLINE_S:.0f} s")
            if line is None:
                code = self.process.wait(timeout=DEADLINE_S)
                pytest.fail(f"tfsd exited with {code} before it listened: {self.stdout_lines}")
            if line.startswith(MASTER_PREFIX):
                self.master_address = line[len(MASTER_PREFIX) :].strip()
            if line.startswith(LISTENING_PREFIX):
                self.address = line[len(LISTENING_PREFIX) :].strip()

    @property
    def pid(self) -> int:
        return self.process.pid

    def wait_for_exit(self, timeout: float) -> int | None:
        """The exit code once the daemon has exited, None if it still runs after `timeout`.

        Waits on a pidfd (readable once the process has terminated), not by polling.
        """
        if self.process.returncode is not None:
            return self.process.returncode
        try:
            fd = os.pidfd_open(self.process.pid)
        except ProcessLookupError:
            return self.process.wait()
        try:
            ready, _, _ = select.select([fd], [], [], timeout)
        finally:
            os.close(fd)
        return self.process.wait() if ready else None

    def stop(self) -> int:
        """SIGTERM, then wait (with a deadline) for the exit code."""
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
        code = self.wait_for_exit(DEADLINE_S)
        if code is None:
            self.kill()
            pytest.fail(f"tfsd did not exit within {DEADLINE_S:.0f} s of SIGTERM")
        return code

    def kill(self) -> None:
        if self.process.returncode is None:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def daemon():
    """A fresh daemon per test; the test fails if it does not stop cleanly (exit code 0)."""
    started = Daemon()
    try:
        yield started
    finally:
        code = started.stop()
    assert code == 0, f"tfsd exited with {code} after SIGTERM"


def python_config(path: Path, interpreter: str | None = None) -> Path:
    """A config file (at `path`) that turns Python sessions on: `[python]` with the test
    interpreter, one warm worker, TensorFlow and Keras preloaded. Workers may read the
    directory `shared` beside it (the worker sandbox keeps them out of the rest): a link to a
    directory in the system's temporary directory, since a root daemon's workers run as
    nobody, who cannot pass pytest's own directories (0700). Pass workers
    `(dir / "shared").resolve()`-based paths."""
    interpreter = interpreter or os.environ.get("TFSD_TEST_PYTHON") or sys.executable
    link = path.parent / "shared"
    if link.is_symlink():
        shared = link.resolve()
    else:
        shared = Path(tempfile.mkdtemp(prefix="tfsd-test-shared-"))
        shared.chmod(0o755)
        atexit.register(shutil.rmtree, shared, True)
        link.symlink_to(shared)
    path.write_text(
        "[python]\n"
        f"interpreter = {json.dumps(interpreter)}\n"
        "pool_size = 1\n"
        'preload = ["tensorflow", "keras"]\n'
        "[sandbox]\n"
        f"read_paths = [{json.dumps(str(shared))}]\n"
    )
    return path


@pytest.fixture
def python_daemon(tmp_path):
    """A fresh daemon per test with Python sessions configured (`python_config`); like
    `daemon`, the test fails if it does not stop cleanly."""
    started = Daemon("--config", str(python_config(tmp_path / "tfsd.toml")))
    try:
        yield started
    finally:
        code = started.stop()
    assert code == 0, f"tfsd exited with {code} after SIGTERM"


@pytest.fixture
def channel(daemon):
    import grpc

    with grpc.insecure_channel(daemon.address, options=CHANNEL_OPTIONS) as opened:
        grpc.channel_ready_future(opened).result(timeout=DEADLINE_S)
        yield opened


@pytest.fixture
def stub(api, channel):
    """A raw `tfsd.v1.SessionService` stub."""
    return api.grpc.SessionServiceStub(channel)


# ---------------------------------------------------------------------------------------------
# A thin client over the stub, for readable tests.


class Client:
    """tfsd.v1 calls with TensorFlow tensors in and numpy arrays out. Every call has a deadline."""

    def __init__(self, api: types.SimpleNamespace, stub) -> None:
        self.api = api
        self.pb2 = api.pb2
        self.stub = stub

    def create(self, graph_def: bytes = b"", config: bytes = b"", **labels: str):
        """CreateSession; returns the SessionInfo."""
        request = self.pb2.CreateSessionRequest(graph_def=graph_def, config=config, labels=labels)
        return self.stub.CreateSession(request, timeout=DEADLINE_S).session

    def run_protos(
        self,
        session_id: str,
        feeds=None,
        fetches=(),
        targets=(),
        timeout_ms: int = 0,
        deadline_s: float | None = None,
    ):
        """Run; `feeds` maps names to TensorProtos (e.g. `tf.make_tensor_proto(x)`); returns
        the output TensorProtos. `deadline_s` is the gRPC deadline (default DEADLINE_S)."""
        request = self.pb2.RunRequest(
            session_id=session_id,
            feeds=feeds or {},
            fetches=list(fetches),
            targets=list(targets),
            timeout_ms=timeout_ms,
        )
        return list(self.stub.Run(request, timeout=deadline_s or DEADLINE_S).outputs)

    def run(
        self,
        session_id: str,
        feeds=None,
        fetches=(),
        targets=(),
        timeout_ms: int = 0,
        deadline_s: float | None = None,
    ):
        """Run; returns the outputs as numpy arrays (`tf.make_ndarray`)."""
        import tensorflow as tf

        outputs = self.run_protos(session_id, feeds, fetches, targets, timeout_ms, deadline_s)
        return [tf.make_ndarray(output) for output in outputs]

    def extend(self, session_id: str, graph_def: bytes, current_graph_version: int) -> int:
        request = self.pb2.ExtendGraphRequest(
            session_id=session_id,
            graph_def=graph_def,
            current_graph_version=current_graph_version,
        )
        return self.stub.ExtendGraph(request, timeout=DEADLINE_S).new_graph_version

    def get(self, session_id: str):
        return self.stub.GetSession(
            self.pb2.GetSessionRequest(session_id=session_id), timeout=DEADLINE_S
        )

    def list(self):
        return list(
            self.stub.ListSessions(self.pb2.ListSessionsRequest(), timeout=DEADLINE_S).sessions
        )

    def reset_graph(self, session_id: str):
        return self.stub.ResetGraph(
            self.pb2.ResetGraphRequest(session_id=session_id), timeout=DEADLINE_S
        )

    def purge_variables(self, session_id: str):
        return self.stub.PurgeVariables(
            self.pb2.PurgeVariablesRequest(session_id=session_id), timeout=DEADLINE_S
        )

    def recycle(self, session_id: str, preserve_variables: bool):
        request = self.pb2.RecycleSessionRequest(
            session_id=session_id, preserve_variables=preserve_variables
        )
        return self.stub.RecycleSession(request, timeout=DEADLINE_S)

    def close(self, session_id: str) -> None:
        self.stub.CloseSession(
            self.pb2.CloseSessionRequest(session_id=session_id), timeout=DEADLINE_S
        )


@pytest.fixture
def client(api, stub) -> Client:
    return Client(api, stub)
