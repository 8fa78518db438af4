"""Python sessions through the `tfsd_client` package, against the real daemon with Python
sessions configured (conftest's `python_daemon`): run_isolated, kept sessions and their resets,
remote exceptions, streamed output, timeouts, interrupts, a client without TensorFlow, and the
package's build with plain pip."""

from __future__ import annotations

import json
import math
import os
import re
import select
import shutil
import subprocess
import sys
import threading
import time

import pytest

from conftest import DEADLINE_S, PROTO_ROOT, REPO_ROOT

grpc = pytest.importorskip("grpc")
cloudpickle = pytest.importorskip("cloudpickle")
tfsd_client = pytest.importorskip("tfsd_client")

# The functions below run in the daemon's Python workers, which cannot import this module (it
# is not on their path): they travel by value, like functions of a notebook or a script.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture
def tfsd(python_daemon):
    with tfsd_client.connect(python_daemon.address, timeout=DEADLINE_S) as connected:
        yield connected


# --- Remote functions ------------------------------------------------------------------------


def worker_pid() -> int:
    return os.getpid()


def echo(*args, **kwargs):
    return args, kwargs


def fit_tiny_model(seed: int):
    import keras
    import numpy as np

    rng = np.random.default_rng(seed)
    x = rng.normal(size=(64, 4)).astype("float32")
    y = x @ np.arange(1, 5, dtype="float32").reshape(4, 1)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    history = model.fit(x, y, epochs=1, batch_size=16, verbose=0)
    return keras.__version__, float(history.history["loss"][-1])


def fail_with_value_error(text: str):
    raise ValueError(f"bad value: {text}")


def chatty(lines: int) -> int:
    for index in range(lines):
        print(f"line {index}")
    print("héllo on stderr", file=sys.stderr)
    return lines


def print_then_wait(fifo: str, deadline_s: float) -> str:
    """Prints, then waits (at most `deadline_s`) for the client to write to `fifo`."""
    import select

    # Open first: the client writes once it sees the print, and a FIFO nobody has open for
    # reading refuses that write (ENXIO).
    fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    print("waiting", flush=True)
    try:
        ready, _, _ = select.select([fd], [], [], deadline_s)
        if not ready:
            raise TimeoutError(f"nothing on {fifo} within {deadline_s} s")
        return os.read(fd, 100).decode()
    finally:
        os.close(fd)


def remember(value) -> int:
    import tfsd_worker

    tfsd_worker.state.x = value
    return os.getpid()


def recall():
    import tfsd_worker

    return tfsd_worker.state.get("x")


def hang():
    while True:
        time.sleep(0.05)


def print_then_hang():
    print("started", flush=True)
    hang()


# --- Tests -----------------------------------------------------------------------------------


def test_run_isolated_runs_each_call_in_a_fresh_worker(tfsd):
    assert tfsd.status().warm_python_pool_size == 1
    pids = [tfsd.run_isolated(worker_pid) for _ in range(3)]
    assert os.getpid() not in pids
    assert len(set(pids)) == 3, pids
    # Every argument goes to the function, even ones named like the client's own.
    assert tfsd.run_isolated(echo, 1, fn=2, timeout=3) == ((1,), {"fn": 2, "timeout": 3})
    # Each session was closed afterwards.
    assert tfsd.sessions() == []


def test_keras_fit_in_run_isolated(tfsd):
    version, loss = tfsd.run_isolated(fit_tiny_model, seed=0)
    assert version.startswith("3."), version
    assert isinstance(loss, float)
    assert math.isfinite(loss) and loss > 0


def test_a_remote_exception_is_a_remote_error(tfsd):
    with pytest.raises(tfsd_client.RemoteError) as raised:
        tfsd.run_isolated(fail_with_value_error, "x")
    error = raised.value
    assert error.type_name == "builtins.ValueError"
    assert error.message == "bad value: x"
    assert "fail_with_value_error" in error.traceback
    text = str(error)
    assert "builtins.ValueError" in text and "bad value: x" in text
    assert "fail_with_value_error" in text
    # Closed on error too.
    assert tfsd.sessions() == []


def test_output_reaches_the_client(tfsd, capsys):
    assert tfsd.run_isolated(chatty, 3) == 3
    captured = capsys.readouterr()
    assert "line 0\nline 1\nline 2\n" in captured.out
    assert "héllo on stderr" in captured.err
    assert "line" not in captured.err


class _Recorder:
    """A stand-in for sys.stdout that says when `marker` has been written."""

    def __init__(self, marker: str) -> None:
        self.marker = marker
        self.text = ""
        self.seen = threading.Event()

    def write(self, text: str) -> int:
        self.text += text
        if self.marker in self.text:
            self.seen.set()
        return len(text)

    def flush(self) -> None:
        pass


def test_output_streams_while_the_call_runs(tfsd, tmp_path, monkeypatch):
    """The remote function prints, then waits for the client: the client must see the print
    before the call ends."""
    # In the directory the daemon's workers may read (conftest.python_config).
    fifo = (tmp_path / "shared").resolve() / "go"
    os.mkfifo(fifo)
    recorder = _Recorder("waiting\n")
    monkeypatch.setattr(sys, "stdout", recorder)
    outcome: dict = {}

    with tfsd.python_session(timeout=DEADLINE_S) as session:

        def call() -> None:
            try:
                outcome["result"] = session.call(print_then_wait, str(fifo), DEADLINE_S)
            except BaseException as error:  # noqa: BLE001 - reported below
                outcome["error"] = error

        caller = threading.Thread(target=call, name="python-session-call")
        caller.start()
        try:
            assert recorder.seen.wait(DEADLINE_S), f"no output while the call ran: {outcome}"
            assert caller.is_alive() and not outcome
        finally:
            # The remote function holds the fifo open for reading: this open does not block
            # (ENXIO if the function never got that far; the call then fails on its own).
            try:
                fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:
                pass
            else:
                os.write(fd, b"go")
                os.close(fd)
            caller.join(DEADLINE_S)
        assert not caller.is_alive()
    assert outcome == {"result": "go"}


def test_a_kept_session_keeps_state_until_purged(tfsd):
    with tfsd.python_session(labels={"test": "kept"}) as session:
        info = session.info()
        assert info.runtime == "python"
        assert info.labels == {"test": "kept"}
        assert info.call_count == 0
        assert info.state == "ready"

        pid = session.call(remember, 42)
        assert pid == info.worker_pid != os.getpid()
        assert session.call(recall) == 42
        assert session.info().call_count == 2

        # A graph reset clears TensorFlow's and Keras's global state, not the session's.
        reset = session.reset_graph()
        assert reset.worker_pid_before == reset.worker_pid_after == pid
        assert reset.memory_before.private_bytes > 0
        assert reset.memory_after.private_bytes > 0
        assert session.call(recall) == 42

        purged = session.purge_variables()
        assert purged.worker_pid_after == pid
        assert purged.memory_before.private_bytes > 0
        assert purged.memory_after.private_bytes > 0
        assert session.call(recall) is None

        session.call(remember, {"weights": [1.0, 2.0]})
        recycled = session.recycle(preserve_variables=True)
        assert recycled.worker_pid_before == pid
        assert recycled.worker_pid_after not in (0, pid)
        assert recycled.memory_before.private_bytes > 0
        assert recycled.memory_after.private_bytes > 0
        assert recycled.variables_preserved == 1
        assert session.call(recall) == {"weights": [1.0, 2.0]}
        assert session.call(worker_pid) == recycled.worker_pid_after
        assert session.info().worker_pid == recycled.worker_pid_after

        fresh = session.recycle()
        assert fresh.worker_pid_after not in (pid, recycled.worker_pid_after)
        assert session.call(recall) is None
    assert session.closed
    session.close()  # idempotent
    assert tfsd.sessions() == []


def test_memory_policy_is_passed_on(tfsd):
    limits = {"soft_limit_bytes": 6 << 30, "hard_limit_bytes": 8 << 30}
    with tfsd.python_session(memory_policy=limits) as session:
        policy = session.info().memory_policy
        assert policy is not None
        assert policy.soft_limit_bytes == limits["soft_limit_bytes"]
        assert policy.hard_limit_bytes == limits["hard_limit_bytes"]
    with pytest.raises(TypeError):
        tfsd.python_session(memory_policy={"soft_limit": 1})


def test_a_timeout_stops_the_call_and_the_session_goes_on(tfsd):
    with tfsd.python_session(timeout=1.0) as session:
        assert session.call(worker_pid) > 0
        started = time.monotonic()
        with pytest.raises(tfsd_client.TfsdError) as raised:
            session.call(hang)
        elapsed = time.monotonic() - started
        assert raised.value.code == grpc.StatusCode.DEADLINE_EXCEEDED, raised.value
        # The daemon's answer, well before the client's own backstop (timeout + DEADLINE_S).
        assert 1.0 <= elapsed < 1.0 + DEADLINE_S / 3, elapsed
        session.timeout = None
        assert session.call(echo, 1) == ((1,), {})
        assert session.info().state == "ready"


def test_an_interrupted_run_isolated_closes_its_session(tfsd, monkeypatch):
    """A KeyboardInterrupt while the call runs (raised here from sys.stdout, as soon as the
    remote function has printed) cancels the call and closes the session."""

    class Interrupting(_Recorder):
        def write(self, text: str) -> int:
            super().write(text)
            if self.seen.is_set():
                raise KeyboardInterrupt
            return len(text)

    monkeypatch.setattr(sys, "stdout", Interrupting("started"))
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        tfsd.run_isolated(print_then_hang)
    assert time.monotonic() - started < DEADLINE_S
    monkeypatch.undo()
    assert tfsd.sessions() == []


KILLED_CLIENT = r"""
import sys, time
import tfsd_client

def print_then_hang():
    print("started", flush=True)
    while True:
        time.sleep(0.05)

tfsd_client.connect(sys.argv[1], timeout=float(sys.argv[2])).run_isolated(print_then_hang)
"""


def test_a_killed_run_isolated_client_leaves_nothing_behind(tfsd, python_daemon):
    """run_isolated asks the daemon to close the session when the call ends however it ends:
    a client killed (SIGKILL) mid-call leaves no session behind."""
    with tfsd.watch(timeout=3 * DEADLINE_S) as events:
        client = subprocess.Popen(
            [sys.executable, "-c", KILLED_CLIENT, python_daemon.address, str(DEADLINE_S)],
            stdout=subprocess.PIPE,
            text=True,
            cwd="/",
        )
        try:
            created = events.next_of("created")
            ready, _, _ = select.select([client.stdout], [], [], 2 * DEADLINE_S)
            assert ready, "the client's call did not start"
            assert client.stdout.readline() == "started\n"
        finally:
            client.kill()
            client.wait(DEADLINE_S)
            client.stdout.close()
        assert events.next_of("closed", created.session_id).session_id == created.session_id
    assert tfsd.sessions() == []


def test_a_script_runs_as_main(tfsd, capsys):
    source = "import sys\nprint(__name__, sys.argv)\nraise SystemExit(3)\n"
    with tfsd.python_session() as session:
        assert session.run_script(source, path="train.py", argv=["--epochs", "1"]) == 3
        assert session.run_script("x = 1\n") == 0
        with pytest.raises(tfsd_client.RemoteError) as raised:
            session.run_script("def main():\n    raise KeyError('k')\nmain()\n", path="bad.py")
    assert "__main__ ['train.py', '--epochs', '1']" in capsys.readouterr().out
    assert raised.value.type_name == "builtins.KeyError"
    assert "bad.py" in raised.value.traceback and "main" in raised.value.traceback


def test_the_stubs_match_the_service():
    """The client builds SessionService's stubs by hand from control.proto's messages (so
    that it never imports tfsd_pb2, and with it TensorFlow): they must match tfsd.proto."""
    text = (PROTO_ROOT / "tfsd" / "v1" / "tfsd.proto").read_text()
    declared = {
        name: (request, response, bool(stream))
        for name, request, stream, response in re.findall(
            r"rpc\s+(\w+)\s*\((\w+)\)\s*returns\s*\((stream\s+)?(\w+)\)", text
        )
    }
    assert declared.pop("Run") == ("RunRequest", "RunResponse", False)
    assert tfsd_client.client._METHODS == declared


NO_TENSORFLOW_CLIENT = r"""
import json, sys, time

class Refuse:
    # Any attempt to import TensorFlow or Keras fails loudly.
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("tensorflow", "keras", "tf_keras"):
            raise ImportError(f"the client must not import {name}")
        return None

sys.meta_path.insert(0, Refuse())

def rss_mib():
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024

before = rss_mib()
started = time.perf_counter()
import tfsd_client
import_s = time.perf_counter() - started
after_import = rss_mib()

def where():
    import os, sys
    return os.getpid(), "tensorflow" in sys.modules, "keras" in sys.modules

started = time.perf_counter()
tfsd = tfsd_client.connect(sys.argv[1], timeout=float(sys.argv[2]))
pid, remote_tf, remote_keras = tfsd.run_isolated(where)
call_s = time.perf_counter() - started
assert remote_tf and remote_keras, "the worker should have TensorFlow and Keras preloaded"
assert "tensorflow" not in sys.modules and "keras" not in sys.modules, sorted(sys.modules)
print(json.dumps({
    "import_s": round(import_s, 3),
    "rss_mib_before_import": round(before, 1),
    "rss_mib_after_import": round(after_import, 1),
    "rss_mib_after_call": round(rss_mib(), 1),
    "run_isolated_s": round(call_s, 3),
    "worker_pid": pid,
}))
"""


def run_client(python: str, address: str, *, env: dict | None = None) -> dict:
    result = subprocess.run(
        [python, "-c", NO_TENSORFLOW_CLIENT, address, str(DEADLINE_S)],
        capture_output=True,
        text=True,
        timeout=2 * DEADLINE_S,
        env=env,
        cwd="/",
    )
    assert result.returncode == 0, f"client failed:\n{result.stdout}\n{result.stderr}"
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    print(f"tfsd_client without TensorFlow ({python}): {figures}")
    return figures


def test_a_client_needs_neither_tensorflow_nor_keras(python_daemon):
    """In a fresh interpreter (TensorFlow installed, but refused): import tfsd_client,
    run_isolated, and neither TensorFlow nor Keras was imported."""
    figures = run_client(sys.executable, python_daemon.address)
    # A generous bound (importing TensorFlow alone takes ~480 MiB). Import time is reported,
    # not asserted: it depends on the machine's load.
    assert figures["rss_mib_after_call"] < 150


PIP_NETWORK_ERRORS = (
    "NewConnectionError",
    "Temporary failure in name resolution",
    "Network is unreachable",
    "No matching distribution found",
)


def test_the_package_installs_with_plain_pip(python_daemon, tmp_path):
    """`pip install python/tfsd_client` in a fresh venv (build isolation: pip fetches the
    declared build requirements), then a Python session from that venv, which has no
    TensorFlow at all. Built from a copy of the package, so the repository's tree is
    untouched; TFSD_PROTO_ROOT points the copy at proto/."""
    source = tmp_path / "tfsd_client"
    shutil.copytree(
        REPO_ROOT / "python" / "tfsd_client",
        source,
        ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__", "_gen"),
    )
    venv = tmp_path / "venv"
    subprocess.run(
        [sys.executable, "-m", "venv", str(venv)], check=True, timeout=DEADLINE_S
    )
    python = str(venv / "bin" / "python")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["TFSD_PROTO_ROOT"] = str(PROTO_ROOT)
    started = time.monotonic()
    install = subprocess.run(
        [python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", str(source)],
        capture_output=True,
        text=True,
        timeout=3 * DEADLINE_S,
        env=env,
    )
    output = install.stdout + install.stderr
    if install.returncode != 0 and any(error in output for error in PIP_NETWORK_ERRORS):
        pytest.skip(f"PyPI is not reachable: {output[-500:]}")
    assert install.returncode == 0, output
    print(f"pip install python/tfsd_client in a fresh venv: {time.monotonic() - started:.1f} s")
    versions = subprocess.run(
        [
            python,
            "-W",
            "error",
            "-c",
            "import google.protobuf, grpc, tfsd_client.client as c; c._control(); "
            "print(google.protobuf.__version__, grpc.__version__)",
        ],
        capture_output=True,
        text=True,
        timeout=DEADLINE_S,
        env=env,
    )
    assert versions.returncode == 0, versions.stderr
    print(f"fresh venv: protobuf, grpcio = {versions.stdout.strip()}")
    run_client(python, python_daemon.address, env=env)


# --- GPUs ------------------------------------------------------------------------------------


def cuda_visible_devices():
    return os.environ.get("CUDA_VISIBLE_DEVICES")


def test_gpu_placement_and_limits_through_the_client(tfsd):
    """`gpus` and the GPU limits reach the daemon: a session asking for no GPU runs in a worker
    that sees none, and its limits come back as the effective policy. On a host without GPUs
    (where this suite runs) its memory lists no device, and a GPU is refused by name."""
    policy = {"gpu_soft_limit_bytes": 1 << 30, "gpu_hard_limit_bytes": 2 << 30}
    with tfsd.python_session(gpus="none", memory_policy=policy) as session:
        assert session.call(cuda_visible_devices) == "-1"
        info = tfsd.session(session.session_id)
        assert info.memory_policy.gpu_soft_limit_bytes == 1 << 30
        assert info.memory_policy.gpu_hard_limit_bytes == 2 << 30
        assert info.memory.gpu == {}
    with pytest.raises(ValueError, match="gpus must be"):
        tfsd.python_session(gpus="all of them")
    status = tfsd.status()
    if status.gpu.startswith("no NVIDIA driver"):
        with pytest.raises(tfsd_client.TfsdError) as refused:
            tfsd.python_session(gpus=[0])
        assert "the session asks for GPU 0 but this host has no GPU" in str(refused.value)
