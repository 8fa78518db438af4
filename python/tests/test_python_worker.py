"""The Python worker runtime (`python -m tfsd_worker`), spoken to as the daemon does.

Each test talks to a real worker process over a Unix socketpair it inherits as fd 3, with
`tfsd.worker.v1` frames (4-byte big-endian length, then one message); the stubs are the
worker package's own (`tfsd_worker._wire.pb`). Starting a worker imports TensorFlow and Keras
(a few seconds), so most tests share one module-scoped worker and leave its state empty;
workers that need no TensorFlow start with `TFSD_PYTHON_PRELOAD=""`. Every read has a
deadline; no test sleeps to wait for anything.

Functions sent to the worker are defined here and pickled by value
(`cloudpickle.register_pickle_by_value`): the worker cannot import this test module.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import queue
import select
import socket
import struct
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import types

import pytest

cloudpickle = pytest.importorskip("cloudpickle")
tfsd_worker = pytest.importorskip("tfsd_worker")

from tfsd_worker._wire import pb  # noqa: E402 - after the skips

# Functions defined in this module travel by value: the worker has no `test_python_worker`.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

# How long one answer, a worker's start, or its exit may take before the test fails.
DEADLINE_S = 60.0

FAILED_PRECONDITION = 9
INVALID_ARGUMENT = 3
UNIMPLEMENTED = 12
STDOUT, STDERR = 1, 2


# ---------------------------------------------------------------------------------------------
# A worker process and its socket.


class Worker:
    """`python -m tfsd_worker` with the child end of a socketpair as fd 3, spawned as the
    daemon does (posix_spawn; stdin and stdout /dev/null; stderr kept in a file)."""

    def __init__(self, preload: str | None = None, ready: bool = True, **env: str) -> None:
        parent, child = socket.socketpair()
        self.sock = parent
        environment = dict(os.environ)
        environment.update(env)
        environment["TFSD_WORKER_FD"] = "3"
        environment["TFSD_SUPERVISOR_PID"] = str(os.getpid())
        environment.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
        if preload is not None:
            environment["TFSD_PYTHON_PRELOAD"] = preload
        self.stderr = tempfile.TemporaryFile()
        child_fd = child.fileno()
        if child_fd == 3:  # dup2 onto itself would leave close-on-exec set
            child_fd = os.dup(child_fd)
        self.started = time.monotonic()
        self.pid = os.posix_spawn(
            sys.executable,
            [sys.executable, "-m", "tfsd_worker"],
            environment,
            file_actions=[
                (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0),
                (os.POSIX_SPAWN_DUP2, self.stderr.fileno(), 2),
                (os.POSIX_SPAWN_DUP2, child_fd, 3),
            ],
        )
        if child_fd != child.fileno():
            os.close(child_fd)
        child.close()
        self.returncode: int | None = None
        self.responses: queue.Queue[pb.WorkerResponse | None] = queue.Queue()
        self.next_id = 100
        self.write_lock = threading.Lock()
        threading.Thread(target=self._read, name=f"worker-{self.pid}", daemon=True).start()
        self.ready: pb.Ready | None = None
        self.ready_after_s = 0.0
        if ready:
            first = self.recv()
            assert first.WhichOneof("result") == "ready", f"first frame: {first}"
            assert first.id == 0
            self.ready = first.ready
            self.ready_after_s = time.monotonic() - self.started

    # -- frames --------------------------------------------------------------------------

    def _read(self) -> None:
        def exactly(n: int) -> bytearray | None:
            data = bytearray(n)
            view = memoryview(data)
            got = 0
            while got < n:
                read = self.sock.recv_into(view[got:], n - got)
                if read == 0:
                    return None
                got += read
            return data

        try:
            while True:
                header = exactly(4)
                if header is None:
                    break
                payload = exactly(struct.unpack(">I", header)[0])
                if payload is None:
                    break
                self.responses.put(pb.WorkerResponse.FromString(payload))
        except OSError:
            pass
        self.responses.put(None)

    def send_bytes(self, payload: bytes) -> None:
        with self.write_lock:
            self.sock.sendall(struct.pack(">I", len(payload)) + payload)

    def send(self, **kind) -> int:
        """Sends a WorkerRequest with a fresh id and `kind` (e.g. reset_graph=pb.ResetGraph())."""
        request_id = self.next_id
        self.next_id += 1
        self.send_bytes(pb.WorkerRequest(id=request_id, **kind).SerializeToString())
        return request_id

    def recv(self, timeout: float = DEADLINE_S) -> pb.WorkerResponse:
        try:
            response = self.responses.get(timeout=timeout)
        except queue.Empty:
            pytest.fail(f"no frame from the worker within {timeout:.0f} s{self.log()}")
        if response is None:
            pytest.fail(f"the worker closed its socket{self.log()}")
        return response

    def request(self, **kind) -> pb.WorkerResponse:
        """One request, its one answer."""
        request_id = self.send(**kind)
        response = self.recv()
        assert response.id == request_id, f"answer to another request: {response}"
        return response

    def call_frames(self, call: pb.Call, call_id: int | None = None):
        """Sends a call (unless `call_id` says it was sent); answers (outputs, call_return)."""
        if call_id is None:
            call_id = self.send(call=call)
        outputs = []
        while True:
            response = self.recv()
            assert response.id == call_id, f"a frame for another request: {response}"
            kind = response.WhichOneof("result")
            if kind == "output":
                outputs.append((response.output.stream, response.output.data))
            elif kind == "call_return":
                return outputs, response.call_return
            else:
                pytest.fail(f"the call was answered with {kind}: {response}")

    def call(self, function, *args, **kwargs):
        """Runs `function(*args, **kwargs)` in the worker; answers (outputs, CallReturn)."""
        pickled = cloudpickle.dumps((function, args, kwargs))
        return self.call_frames(pb.Call(pickled=pickled))

    def value(self, function, *args, **kwargs):
        """The return value of a call that must succeed."""
        _, returned = self.call(function, *args, **kwargs)
        outcome = returned.WhichOneof("outcome")
        assert outcome == "pickled", f"the call ended with {outcome}: {returned}"
        return cloudpickle.loads(returned.pickled)

    # -- the process ---------------------------------------------------------------------

    def wait(self, timeout: float = DEADLINE_S) -> int | None:
        """The exit status once the worker has exited, None if it still runs after `timeout`."""
        if self.returncode is not None:
            return self.returncode
        fd = os.pidfd_open(self.pid)
        try:
            exited, _, _ = select.select([fd], [], [], timeout)
        finally:
            os.close(fd)
        if not exited:
            return None
        _, status = os.waitpid(self.pid, 0)
        self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def log(self) -> str:
        self.stderr.seek(0)
        text = self.stderr.read().decode(errors="replace")
        return f"\nworker stderr:\n{text}" if text else ""

    def rss_anon_kib(self) -> int:
        with open(f"/proc/{self.pid}/status") as status:
            for line in status:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1])
        return 0

    def hang_up(self) -> None:
        """Closes the supervisor's end. shutdown() first: a plain close() does not end the
        stream while our reader thread is blocked in recv() on the same socket."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()

    def close(self) -> None:
        self.hang_up()
        if self.wait() is None:
            os.kill(self.pid, 9)
            self.wait()
        self.stderr.close()


@pytest.fixture(scope="module")
def worker():
    """One worker with the default preload (TensorFlow and Keras), shared by the module."""
    started = Worker()
    yield started
    started.close()


@pytest.fixture(autouse=True)
def clean_state(request):
    """Tests leave the shared worker's namespace empty (cleared by a call: a purge would also
    reset Keras and collect garbage, half a second each time)."""
    yield
    if "worker" in request.fixturenames:
        shared = request.getfixturevalue("worker")
        if shared.returncode is None:
            assert shared.value(clear_state) == 0


def clear_state():
    import tfsd_worker

    tfsd_worker.state.clear()
    return len(tfsd_worker.state)


# ---------------------------------------------------------------------------------------------
# What the tests run in the worker.


def add(a, b, scale=1):
    return (a + b) * scale


def raise_value_error(text):
    raise ValueError(f"bad value: {text}")


def talk():
    print("hello from the worker")
    print("to stderr", file=sys.stderr)
    sys.stdout.write("partial ")
    sys.stdout.flush()
    print("done")
    return "answer"


def spin_until_cancelled():
    print("spinning", flush=True)
    while True:
        time.sleep(0.01)


def sleep_until_cancelled():
    print("sleeping", flush=True)
    time.sleep(600)


def print_until_cancelled():
    # Mostly in the worker's output code when the interrupt comes.
    while True:
        print("tick")


def write_bytes_until_cancelled():
    while True:
        sys.stdout.buffer.write(b"tick\n")
        sys.stdout.buffer.flush()


class Counter:
    """A class of the test's own: travels by value."""

    def __init__(self, start):
        self.count = start

    def bump(self):
        self.count += 1
        return self.count


def store(**values):
    import tfsd_worker

    for name, value in values.items():
        tfsd_worker.state[name] = value
    return sorted(tfsd_worker.state)


def names_in_state():
    import tfsd_worker

    return sorted(tfsd_worker.state)


def bump_counter():
    import tfsd_worker

    return tfsd_worker.state.counter.bump()


def store_lock():
    import threading

    import tfsd_worker

    tfsd_worker.state.fine = [1, 2, 3]
    tfsd_worker.state.lock = threading.Lock()
    tfsd_worker.state.nested = {"ok": 1, "sock": __import__("socket").socket()}


def return_lock():
    import threading

    return {"value": 1, "lock": threading.Lock()}


def build_model():
    import keras
    import numpy as np

    import tfsd_worker

    keras.utils.set_random_seed(7)
    model = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(8, activation="relu"), keras.layers.Dense(1)]
    )
    model.compile(optimizer="adam", loss="mse")
    x = np.random.default_rng(0).normal(size=(16, 4)).astype("float32")
    model.fit(x, x.sum(axis=1, keepdims=True), epochs=2, verbose=0)
    tfsd_worker.state.model = model
    tfsd_worker.state.x = x
    tfsd_worker.state.plain = {"numbers": [1, 2, 3], "inc": lambda v: v + 1}
    tfsd_worker.state.counter = Counter(10)
    return model.predict(x, verbose=0)


def use_restored_state():
    import tfsd_worker

    state = tfsd_worker.state
    prediction = state.model.predict(state.x, verbose=0)
    return (
        type(state.model).__name__,
        prediction,
        state.plain["numbers"],
        state.plain["inc"](1),
        state.counter.bump(),
    )


# ---------------------------------------------------------------------------------------------
# Tests.


def tensorflow_distribution_version() -> str:
    for name in ("tensorflow-cpu", "tensorflow"):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    pytest.skip("no tensorflow distribution installed")


def test_ready_names_the_process_and_its_versions(worker):
    assert worker.ready.pid == worker.pid
    tf_version = tensorflow_distribution_version()
    assert worker.ready.tensorflow_version == tf_version
    assert worker.ready.runtime == (
        f"python {platform.python_version()}, tensorflow {tf_version}, "
        f"keras {importlib.metadata.version('keras')}"
    )
    print(
        f"worker ready {worker.ready_after_s:.2f} s after spawn; "
        f"RssAnon now {worker.rss_anon_kib() / 1024:.0f} MiB"
    )


def test_pickled_call_returns_its_result(worker):
    assert worker.value(add, 2, 3, scale=10) == 50
    assert worker.value(lambda: Counter(1).bump()) == 2


def test_exception_comes_back_with_type_message_and_user_traceback(worker):
    outputs, returned = worker.call(raise_value_error, "x")
    assert outputs == []
    assert returned.WhichOneof("outcome") == "exception"
    exception = returned.exception
    assert exception.type_name == "builtins.ValueError"
    assert exception.message == "bad value: x"
    assert "in raise_value_error" in exception.traceback
    assert exception.traceback.rstrip().endswith("ValueError: bad value: x")
    assert "tfsd_worker" not in exception.traceback, exception.traceback


def test_output_is_streamed_before_the_return(worker):
    outputs, returned = worker.call(talk)
    assert cloudpickle.loads(returned.pickled) == "answer"
    stdout = b"".join(data for stream, data in outputs if stream == STDOUT)
    stderr = b"".join(data for stream, data in outputs if stream == STDERR)
    assert stdout == b"hello from the worker\npartial done\n"
    assert stderr == b"to stderr\n"
    # Line by line, not one frame at the end.
    assert outputs[0] == (STDOUT, b"hello from the worker\n")
    assert (STDOUT, b"partial ") in outputs


def test_unpicklable_result_names_what_could_not_be_pickled(worker):
    _, returned = worker.call(return_lock)
    exception = returned.exception
    assert exception.type_name == "builtins.TypeError"
    assert "result['lock']" in exception.message, exception.message
    assert "_thread.lock" in exception.message, exception.message


def test_unpicklable_call_comes_back_as_an_exception(worker):
    # A function pickled by reference to a module the worker cannot import.
    module = types.ModuleType("tfsd_test_module_the_worker_lacks")
    exec("def f():\n    return 1\n", module.__dict__)
    sys.modules[module.__name__] = module
    try:
        pickled = cloudpickle.dumps((module.f, (), {}))
    finally:
        del sys.modules[module.__name__]
    _, returned = worker.call_frames(pb.Call(pickled=pickled))
    exception = returned.exception
    assert exception.type_name == "builtins.ModuleNotFoundError"
    assert "tfsd_test_module_the_worker_lacks" in exception.message
    assert "unpickling" in exception.message


def test_script_runs_as_main_with_argv_and_exit_code(worker):
    source = textwrap.dedent(
        """
        import sys
        print(__name__, __file__, sys.argv)
        print("warning", file=sys.stderr)
        if __name__ == "__main__":
            sys.exit(3)
        """
    ).encode()
    path = "/tmp/user/train.py"
    script = pb.Script(path=path, source=source, argv=["--epochs", "2"])
    outputs, returned = worker.call_frames(pb.Call(script=script))
    assert returned.WhichOneof("outcome") == "exit_code"
    assert returned.exit_code == 3
    assert outputs == [
        (STDOUT, f"__main__ {path} ['{path}', '--epochs', '2']\n".encode()),
        (STDERR, b"warning\n"),
    ]
    # sys.argv and __main__ are the worker's again.
    argv0, main_file = worker.value(lambda: (sys.argv[0], sys.modules["__main__"].__file__))
    assert argv0 == main_file and main_file.endswith(os.path.join("tfsd_worker", "__main__.py"))


def test_script_exit_codes_and_exceptions(worker):
    def run(source: str):
        script = pb.Script(path="job.py", source=source.encode())
        return worker.call_frames(pb.Call(script=script))

    assert run("x = 1\n")[1].exit_code == 0
    assert run("import sys; sys.exit()\n")[1].exit_code == 0
    outputs, returned = run("import sys; sys.exit('giving up')\n")
    assert returned.exit_code == 1
    assert outputs == [(STDERR, b"giving up\n")]

    _, returned = run("def main():\n    raise KeyError('k')\nmain()\n")
    assert returned.exception.type_name == "builtins.KeyError"
    assert 'File "job.py", line 2, in main' in returned.exception.traceback
    assert "tfsd_worker" not in returned.exception.traceback

    _, returned = run("def broken(:\n")
    assert returned.exception.type_name == "builtins.SyntaxError"


@pytest.mark.parametrize(
    "function",
    [
        spin_until_cancelled,
        sleep_until_cancelled,
        print_until_cancelled,
        write_bytes_until_cancelled,
    ],
)
def test_cancel_interrupts_the_running_call(worker, function):
    call_id = worker.send(call=pb.Call(pickled=cloudpickle.dumps((function, (), {}))))
    started = worker.recv()
    assert started.id == call_id and started.WhichOneof("result") == "output", started
    output = [started.output.data]
    cancel_id = worker.send(cancel=pb.Cancel(call_id=call_id))
    cancel_answer = call_return = None
    while cancel_answer is None or call_return is None:
        response = worker.recv()
        kind = response.WhichOneof("result")
        if response.id == cancel_id:
            cancel_answer = response
        elif response.id == call_id and kind == "output":
            assert call_return is None, "output after the call's return"
            output.append(response.output.data)
        else:
            assert response.id == call_id and kind == "call_return", response
            call_return = response.call_return
    assert cancel_answer.WhichOneof("result") == "done"
    exception = call_return.exception
    assert exception.type_name == "builtins.KeyboardInterrupt", call_return
    assert f"in {function.__name__}" in exception.traceback
    assert "tfsd_worker" not in exception.traceback, exception.traceback
    if function in (print_until_cancelled, write_bytes_until_cancelled):
        # Every line once, whole; the interrupt may split the last one from its newline.
        text = b"".join(output).decode()
        assert text.replace("tick\n", "") in ("", "tick"), text[-200:]
    else:
        assert len(output) == 1
    # The worker goes on serving.
    assert worker.value(add, 1, 1) == 2


def test_cancel_of_an_unknown_call_is_done(worker):
    assert worker.request(cancel=pb.Cancel(call_id=123456)).WhichOneof("result") == "done"


def test_state_survives_calls_reset_keeps_it_purge_clears_it(worker):
    assert worker.value(store, counter=Counter(0), text="kept") == ["counter", "text"]
    assert worker.value(bump_counter) == 1
    assert worker.value(bump_counter) == 2
    assert worker.request(reset_graph=pb.ResetGraph()).WhichOneof("result") == "done"
    assert worker.value(bump_counter) == 3
    assert worker.request(purge_variables=pb.PurgeVariables()).WhichOneof("result") == "done"
    assert worker.value(names_in_state) == []


def test_unpicklable_state_fails_export_naming_the_attribute(worker):
    worker.value(store_lock)
    response = worker.request(export_state=pb.ExportState())
    assert response.WhichOneof("result") == "error", response
    assert response.error.code == FAILED_PRECONDITION
    message = response.error.message
    assert "state.lock" in message and "_thread.lock" in message, message
    assert "state.nested['sock']" in message, message
    assert "state.fine" not in message, message


def test_export_state_to_a_fresh_worker_restores_objects_and_keras_model(worker):
    _, returned = worker.call(build_model)
    assert returned.WhichOneof("outcome") == "pickled", returned
    expected = cloudpickle.loads(returned.pickled)
    exported = worker.request(export_state=pb.ExportState())
    assert exported.WhichOneof("result") == "state", exported
    assert exported.state.objects == 4

    fresh = Worker()
    try:
        imported = fresh.request(import_state=pb.ImportState(state=exported.state.state))
        assert imported.WhichOneof("result") == "done", imported
        name, prediction, numbers, incremented, count = fresh.value(use_restored_state)
        assert name == "Sequential"
        assert (prediction == expected).all(), (prediction, expected)
        assert numbers == [1, 2, 3]
        assert incremented == 2
        assert count == 11
    finally:
        fresh.close()


def test_import_state_rejects_foreign_bytes(worker):
    response = worker.request(import_state=pb.ImportState(state=b"not a state"))
    assert response.WhichOneof("result") == "error"
    assert response.error.code == INVALID_ARGUMENT


@pytest.mark.parametrize(
    "kind",
    [
        {"load": pb.Load()},
        {"extend": pb.Extend()},
        {"run": pb.Run()},
        {"partial_run_setup": pb.PartialRunSetup()},
        {"partial_run": pb.PartialRun()},
        {"export_variables": pb.ExportVariables()},
        {"import_variables": pb.ImportVariables()},
    ],
    ids=lambda kind: next(iter(kind)),
)
def test_graph_requests_are_unimplemented(worker, kind):
    response = worker.request(**kind)
    assert response.WhichOneof("result") == "error"
    assert response.error.code == UNIMPLEMENTED
    assert f"{next(iter(kind))} applies to graph sessions" in response.error.message


def test_bad_requests(worker):
    response = worker.request()  # no kind
    assert response.error.code == INVALID_ARGUMENT
    # A frame that is no WorkerRequest has no id to answer: it is skipped.
    worker.send_bytes(b"\xff\xff\xff")
    assert worker.value(add, 2, 2) == 4
    # A call with no target.
    response = worker.request(call=pb.Call())
    assert response.error.code == INVALID_ARGUMENT


def test_empty_preload_imports_nothing():
    started = Worker(preload="")
    try:
        assert started.ready.tensorflow_version == ""
        assert started.ready.runtime == f"python {platform.python_version()}"
        assert started.value(lambda: "tensorflow" in sys.modules) is False
        # Resets need no TensorFlow.
        assert started.request(reset_graph=pb.ResetGraph()).WhichOneof("result") == "done"
    finally:
        started.close()


def test_failing_preload_exits_1_before_ready():
    started = Worker(preload="json,tfsd_no_such_module", ready=False)
    assert started.wait() == 1
    assert started.responses.get(timeout=DEADLINE_S) is None  # no frame at all
    log = started.log()
    assert "tfsd_no_such_module" in log and "ModuleNotFoundError" in log, log
    started.close()


def test_worker_exits_when_the_socket_closes_even_during_a_call():
    started = Worker(preload="")
    call_id = started.send(
        call=pb.Call(pickled=cloudpickle.dumps((spin_until_cancelled, (), {})))
    )
    assert started.recv().id == call_id  # it is spinning
    started.hang_up()
    assert started.wait(DEADLINE_S) == 0, started.log()


# The stubs' TensorProto lives in a private descriptor pool: TensorFlow's own tensor.proto and
# the worker's subset of it coexist in one process, and neither is the other.
STUBS_BESIDE_TENSORFLOW = textwrap.dedent(
    """
    import tensorflow as tf
    from google.protobuf import descriptor_pool
    from tensorflow.core.framework import tensor_pb2

    from tfsd_worker._gen.tensorflow.core.framework import tensor_pb2 as subset
    from tfsd_worker._wire import pb

    default = descriptor_pool.Default().FindFileByName("tensorflow/core/framework/tensor.proto")
    assert default is tensor_pb2.DESCRIPTOR, "TensorFlow's file is not the default pool's"
    assert subset.DESCRIPTOR is not tensor_pb2.DESCRIPTOR
    proto = tf.make_tensor_proto([1.0, 2.0])
    feed = subset.TensorProto.FromString(proto.SerializeToString())
    request = pb.WorkerRequest(id=1, run=pb.Run(feeds={"x": feed}))
    again = pb.WorkerRequest.FromString(request.SerializeToString())
    back = tensor_pb2.TensorProto.FromString(again.run.feeds["x"].SerializeToString())
    assert list(tf.make_ndarray(back)) == [1.0, 2.0]
    print("ok")
    """
)


def test_stubs_then_tensorflow_in_one_process(worker):
    """The worker itself imports its stubs first, then preloads TensorFlow."""
    script = pb.Script(path="stubs.py", source=STUBS_BESIDE_TENSORFLOW.encode())
    outputs, returned = worker.call_frames(pb.Call(script=script))
    assert returned.WhichOneof("outcome") == "exit_code", returned
    assert (returned.exit_code, outputs) == (0, [(STDOUT, b"ok\n")])


def test_tensorflow_then_stubs_in_one_process():
    result = subprocess.run(
        [sys.executable, "-c", STUBS_BESIDE_TENSORFLOW],
        capture_output=True,
        text=True,
        timeout=DEADLINE_S,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_stubs_alone_import_no_tensorflow():
    code = (
        "import sys\n"
        "from google.protobuf import descriptor_pool\n"
        "from tfsd_worker._wire import pb\n"
        "assert not [m for m in sys.modules if m.split('.')[0] == 'tensorflow']\n"
        "try:\n"
        "    descriptor_pool.Default().FindFileByName('tensorflow/core/framework/tensor.proto')\n"
        "except KeyError:\n"
        "    print('ok')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=DEADLINE_S
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
