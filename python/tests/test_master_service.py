"""TensorFlow's own Python client on tfsd: `tf.compat.v1.Session("grpc://...")`, unmodified.

The daemon serves TensorFlow's MasterService beside tfsd.v1 (`daemon.master_address`). Every
test drives it with the real TensorFlow 2.21 client and checks what the client sees against
in-process TensorFlow, and what an operator sees through tfsd.v1 (`client`).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

from conftest import DEADLINE_S, REPO_ROOT, Daemon

tf = pytest.importorskip("tensorflow")

RTOL = 1e-4
ATOL = 1e-6
STEPS = 200


def target(daemon) -> str:
    return f"grpc://{daemon.master_address}"


def wait_for_a_ready_worker(daemon) -> None:
    """Waits (with a deadline) until tfsd.v1 reports SERVING, i.e. a worker has started, so
    that creating a session does not wait for TensorFlow to load. Raw grpc.health.v1 bytes:
    HealthCheckRequest{service} in, HealthCheckResponse{status: SERVING = 1} out."""
    import grpc

    service = b"tfsd.v1.SessionService"
    request = b"\n" + bytes([len(service)]) + service
    with grpc.insecure_channel(daemon.address) as channel:
        watch = channel.unary_stream("/grpc.health.v1.Health/Watch")(request, timeout=DEADLINE_S)
        for response in watch:
            if response == b"\x08\x01":
                watch.cancel()
                return


def master_sessions(client) -> list:
    """The daemon's MasterService sessions, as tfsd.v1 lists them."""
    return [s for s in client.list() if s.labels.get("tfsd.origin") == "master"]


def only_master_session(client):
    sessions = master_sessions(client)
    assert len(sessions) == 1, sessions
    return sessions[0]


class LogisticRegression:
    """A TF1 graph: logistic regression trained with GradientDescentOptimizer."""

    def __init__(self) -> None:
        rng = np.random.default_rng(7)
        self.xs = rng.normal(size=(128, 2)).astype(np.float32)
        self.ys = (self.xs @ np.array([[1.5], [-2.0]], np.float32) > 0.25).astype(np.float32)
        self.graph = tf.Graph()
        with self.graph.as_default():
            self.x = tf.compat.v1.placeholder(tf.float32, [None, 2], name="x")
            self.y = tf.compat.v1.placeholder(tf.float32, [None, 1], name="y")
            w = tf.compat.v1.get_variable("w", [2, 1], initializer=tf.compat.v1.zeros_initializer())
            b = tf.compat.v1.get_variable("b", [1], initializer=tf.compat.v1.zeros_initializer())
            logits = tf.matmul(self.x, w) + b
            self.loss = tf.reduce_mean(
                tf.nn.sigmoid_cross_entropy_with_logits(labels=self.y, logits=logits), name="loss"
            )
            self.train = tf.compat.v1.train.GradientDescentOptimizer(0.5).minimize(self.loss)
            self.init = tf.compat.v1.global_variables_initializer()

    def feed(self) -> dict:
        return {self.x: self.xs, self.y: self.ys}

    def losses(self, session, steps: int = STEPS, on_step=None) -> list[float]:
        session.run(self.init)
        losses = []
        for step in range(steps):
            loss, _ = session.run([self.loss, self.train], self.feed())
            losses.append(float(loss))
            if on_step is not None:
                on_step(step)
        return losses


@pytest.fixture
def model() -> LogisticRegression:
    return LogisticRegression()


@pytest.fixture
def in_process_losses(model) -> list[float]:
    with tf.compat.v1.Session(graph=model.graph) as session:
        return model.losses(session)


def test_training_reaches_the_in_process_loss(daemon, client, model, in_process_losses):
    with tf.compat.v1.Session(target(daemon), graph=model.graph) as session:
        losses = model.losses(session)
        info = only_master_session(client)
    np.testing.assert_allclose(losses, in_process_losses, rtol=RTOL, atol=ATOL)
    assert losses[-1] < losses[0] / 2
    # A real tfsd session with its own worker, counted like any other.
    assert info.worker_pid > 0
    assert info.run_count >= STEPS
    assert "tfsd.master.client" in info.labels
    # close() closed the tfsd session too.
    assert master_sessions(client) == []


def test_an_operator_recycle_mid_loop_does_not_break_the_client(
    daemon, client, model, in_process_losses
):
    recycled = threading.Event()
    answers = []

    def recycle_at(step: int) -> None:
        if step == STEPS // 4:
            # From another thread, while the client keeps stepping.
            def recycle() -> None:
                session_id = only_master_session(client).session_id
                answers.append(client.recycle(session_id, preserve_variables=True))
                recycled.set()

            threading.Thread(target=recycle, daemon=True).start()
        if step == STEPS // 2:
            assert recycled.wait(DEADLINE_S), "the recycle did not finish"

    with tf.compat.v1.Session(target(daemon), graph=model.graph) as session:
        losses = model.losses(session, on_step=recycle_at)
        info = only_master_session(client)
    (answer,) = answers
    assert answer.worker_pid_before != answer.worker_pid_after
    assert answer.variables_preserved >= 2
    assert info.recycle_count == 1
    assert info.worker_pid == answer.worker_pid_after
    np.testing.assert_allclose(losses, in_process_losses, rtol=RTOL, atol=ATOL)


def test_ops_added_mid_session_extend_the_graph(daemon, client):
    graph = tf.Graph()
    with graph.as_default():
        x = tf.compat.v1.placeholder(tf.float32, [None], name="x")
        doubled = tf.multiply(x, 2.0)
    with tf.compat.v1.Session(target(daemon), graph=graph) as session:
        np.testing.assert_allclose(session.run(doubled, {x: [1.0, 2.0]}), [2.0, 4.0])
        version = only_master_session(client).graph_version
        with graph.as_default():
            shifted = tf.add(doubled, 10.0)
        np.testing.assert_allclose(session.run(shifted, {x: [1.0]}), [12.0])
        assert only_master_session(client).graph_version == version + 1


def test_list_devices_names_the_workers_cpu(daemon):
    with tf.compat.v1.Session(target(daemon), graph=tf.Graph()) as session:
        devices = session.list_devices()
    assert [d.name for d in devices] == ["/job:localhost/replica:0/task:0/device:CPU:0"]
    assert devices[0].device_type == "CPU"


def test_feeds_and_fetches_of_every_dtype(daemon):
    values = {
        tf.float16: np.array([1.5, -2.25], np.float16),
        tf.float32: np.arange(6, dtype=np.float32).reshape(2, 3),
        tf.float64: np.array([np.pi], np.float64),
        tf.int8: np.array([-128, 127], np.int8),
        tf.int16: np.array([-300, 300], np.int16),
        tf.int32: np.array([[1, -2], [3, 4]], np.int32),
        tf.int64: np.array([2**40, -(2**40)], np.int64),
        tf.uint8: np.array([0, 255], np.uint8),
        tf.uint16: np.array([65535], np.uint16),
        tf.bool: np.array([True, False, True]),
        tf.string: np.array([b"plain", b"", b"\xff\x00 not utf-8"], dtype=object),
        # More than gRPC's default 4 MiB, each way.
        tf.double: np.linspace(0, 1, 1 << 20),
    }
    graph = tf.Graph()
    pairs = []
    with graph.as_default():
        for index, (dtype, value) in enumerate(values.items()):
            placeholder = tf.compat.v1.placeholder(dtype, value.shape, name=f"in_{index}")
            pairs.append((placeholder, tf.identity(placeholder), value))
        lengths = tf.strings.length(pairs[10][0])
    with tf.compat.v1.Session(target(daemon), graph=graph) as session:
        feed = {placeholder: value for placeholder, _, value in pairs}
        outputs = session.run([output for _, output, _ in pairs], feed)
        for (_, _, value), output in zip(pairs, outputs):
            assert output.dtype == value.dtype
            np.testing.assert_array_equal(output, value)
        np.testing.assert_array_equal(session.run(lengths, feed), [5, 0, 12])


def test_partial_run(daemon):
    graph = tf.Graph()
    with graph.as_default():
        a = tf.compat.v1.placeholder(tf.float32, [], name="a")
        b = tf.compat.v1.placeholder(tf.float32, [], name="b")
        c = tf.compat.v1.placeholder(tf.float32, [], name="c")
        r1 = tf.add(a, b)
        r2 = tf.multiply(r1, c)
    with tf.compat.v1.Session(target(daemon), graph=graph) as session:
        handle = session.partial_run_setup([r1, r2], [a, b, c])
        first = session.partial_run(handle, r1, feed_dict={a: 1.0, b: 2.0})
        assert first == 3.0
        assert session.partial_run(handle, r2, feed_dict={c: first}) == 9.0
        # A second partial run on the same session.
        handle = session.partial_run_setup([r2], [a, b, c])
        assert session.partial_run(handle, r2, feed_dict={a: 1.0, b: 1.0, c: 5.0}) == 10.0


def test_the_private_callable_api(daemon):
    from tensorflow.core.protobuf import config_pb2

    graph = tf.Graph()
    with graph.as_default():
        x = tf.compat.v1.placeholder(tf.float32, [None], name="x")
        total = tf.compat.v1.Variable(0.0, name="total", use_resource=False)
        add = tf.compat.v1.assign_add(total, tf.reduce_sum(x), name="add")
        init = tf.compat.v1.global_variables_initializer()
    with tf.compat.v1.Session(target(daemon), graph=graph) as session:
        session.run(init)
        options = config_pb2.CallableOptions(feed=["x:0"], fetch=[add.name], target=[])
        callable_ = session._make_callable_from_options(options)
        assert callable_(np.array([1.0, 2.0], np.float32))[0] == 3.0
        assert callable_(np.array([4.0], np.float32))[0] == 7.0
        # One that only runs a target.
        reset = session._make_callable_from_options(
            config_pb2.CallableOptions(target=[init.name])
        )
        reset()
        assert session.run(total) == 0.0
        del callable_, reset  # ReleaseCallable


class TestErrorsSurfaceAsTensorFlowExceptions:
    def test_invalid_argument(self, daemon):
        graph = tf.Graph()
        with graph.as_default():
            x = tf.compat.v1.placeholder(tf.float32, None, name="x")
            reshaped = tf.reshape(x, [3])
        with tf.compat.v1.Session(target(daemon), graph=graph) as session:
            with pytest.raises(tf.errors.InvalidArgumentError, match="reshape"):
                session.run(reshaped, {x: [1.0, 2.0]})
            # The session is still fine.
            np.testing.assert_array_equal(session.run(reshaped, {x: [1.0, 2.0, 3.0]}), [1, 2, 3])

    def test_failed_precondition(self, daemon):
        graph = tf.Graph()
        with graph.as_default():
            v = tf.compat.v1.Variable(1.0, name="v", use_resource=False)
        with tf.compat.v1.Session(target(daemon), graph=graph) as session:
            with pytest.raises(tf.errors.FailedPreconditionError, match="uninitialized"):
                session.run(v)

    def test_not_found_after_an_operator_closed_the_session(self, daemon, client):
        graph = tf.Graph()
        with graph.as_default():
            one = tf.constant(1.0)
        session = tf.compat.v1.Session(target(daemon), graph=graph)
        assert session.run(one) == 1.0
        client.close(only_master_session(client).session_id)
        with pytest.raises(tf.errors.NotFoundError, match="MasterService session"):
            session.run(one)
        session.close()

    def test_deadline_exceeded_from_run_options(self, daemon):
        graph = tf.Graph()
        with graph.as_default():
            queue = tf.queue.FIFOQueue(1, tf.float32)
            dequeue = queue.dequeue()
        with tf.compat.v1.Session(target(daemon), graph=graph) as session:
            options = tf.compat.v1.RunOptions(timeout_in_ms=200)
            with pytest.raises(tf.errors.DeadlineExceededError):
                session.run(dequeue, options=options)

    def test_deadline_exceeded_from_operation_timeout(self, daemon):
        graph = tf.Graph()
        with graph.as_default():
            queue = tf.queue.FIFOQueue(1, tf.float32)
            dequeue = queue.dequeue()
            one = tf.constant(1.0)
        # The timeout is also the client's deadline for creating the session: start with a
        # worker ready, so that a loaded machine does not fail the first step.
        wait_for_a_ready_worker(daemon)
        config = tf.compat.v1.ConfigProto(operation_timeout_in_ms=3000)
        with tf.compat.v1.Session(target(daemon), graph=graph, config=config) as session:
            assert session.run(one) == 1.0
            with pytest.raises(tf.errors.DeadlineExceededError):
                session.run(dequeue)


def test_past_max_sessions_the_client_gets_resource_exhausted(tmp_path):
    config = tmp_path / "tfsd.toml"
    config.write_text("[limits]\nmax_sessions = 1\n")
    daemon = Daemon("--config", str(config))
    try:
        graph = tf.Graph()
        with graph.as_default():
            one = tf.constant(1.0)
        with tf.compat.v1.Session(target(daemon), graph=graph) as first:
            assert first.run(one) == 1.0
            second = tf.compat.v1.Session(target(daemon), graph=graph)
            with pytest.raises(tf.errors.ResourceExhaustedError, match="limits.max_sessions"):
                second.run(one)
            second.close()
            assert first.run(one) == 1.0
        # The first session is closed: its place is free again.
        with tf.compat.v1.Session(target(daemon), graph=graph) as third:
            assert third.run(one) == 1.0
    finally:
        assert daemon.stop() == 0


def test_reset_clears_this_clients_sessions_and_no_tfsd_v1_session(daemon, client):
    graph = tf.Graph()
    with graph.as_default():
        v = tf.compat.v1.Variable(3.0, name="v", use_resource=False)
        init = tf.compat.v1.global_variables_initializer()
    own = client.create(graph.as_graph_def().SerializeToString())
    client.run(own.session_id, targets=[init.name])

    with tf.compat.v1.Session(target(daemon), graph=graph) as session:
        session.run(init)
        assert session.run(v) == 3.0
        handle = only_master_session(client).session_id
        tf.compat.v1.Session.reset(target(daemon))
        # Cleared, but open, with the same handle (TensorFlow's server would close it).
        with pytest.raises(tf.errors.FailedPreconditionError):
            session.run(v)
        session.run(init)
        assert session.run(v) == 3.0
        assert only_master_session(client).session_id == handle
        assert only_master_session(client).purge_count == 1

    # The tfsd.v1 session was not touched.
    assert client.run(own.session_id, fetches=["v:0"])[0] == 3.0
    assert client.get(own.session_id).purge_count == 0


KERAS_PROGRAM = textwrap.dedent(
    """
    # A graph-mode Keras 2 program (tf_keras), unmodified but for the session's target.
    import sys
    import numpy as np
    import tensorflow as tf

    tf.compat.v1.disable_eager_execution()
    import tf_keras.api._v1.keras as keras

    keras.backend.set_session(tf.compat.v1.Session(sys.argv[1]))
    rng = np.random.default_rng(0)
    xs = rng.normal(size=(64, 3)).astype(np.float32)
    ys = xs @ np.array([[2.0], [-3.0], [0.5]], np.float32) + 1.0
    model = keras.Sequential([keras.layers.Dense(1, input_shape=(3,))])
    model.compile(optimizer=keras.optimizers.legacy.SGD(0.1), loss="mse")
    history = model.fit(xs, ys, epochs=20, batch_size=16, verbose=0)
    print("first", history.history["loss"][0])
    print("last", history.history["loss"][-1])
    print("error", float(np.abs(model.predict(xs, verbose=0) - ys).max()))
    """
)


def test_a_graph_mode_keras_2_program_trains(daemon, client):
    pytest.importorskip("tf_keras")
    # In a child process: it switches eager execution off for the whole process.
    result = subprocess.run(
        [sys.executable, "-c", KERAS_PROGRAM, target(daemon)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=4 * DEADLINE_S,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    lines = dict(line.split() for line in result.stdout.splitlines() if line.strip())
    assert float(lines["last"]) < float(lines["first"]) / 100
    assert float(lines["error"]) < 0.05
