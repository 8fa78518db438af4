"""The `tfsd_client` package (python/tfsd_client, installed into .venv by scripts/python-env)
against the real daemon: sessions, resets, events, and MasterService sessions by name."""

from __future__ import annotations

import contextlib
import threading

import numpy as np
import pytest

from conftest import DEADLINE_S, Daemon

tf = pytest.importorskip("tensorflow")
tfsd_client = pytest.importorskip("tfsd_client")


@pytest.fixture(autouse=True)
def current_stubs(api):
    """The package's stubs must come from the same tfsd.proto as the `api` fixture's (both
    register tfsd/v1/tfsd.proto in protobuf's default pool); say how to fix it if not."""
    try:
        tfsd_client.client._stubs()
    except TypeError as error:
        pytest.fail(
            f"the installed tfsd_client was built from another tfsd.proto ({error}): run "
            "scripts/python-env"
        )


@pytest.fixture
def tfsd(daemon):
    with tfsd_client.connect(daemon.address, timeout=DEADLINE_S) as connected:
        yield connected


def regression_graph():
    graph = tf.Graph()
    with graph.as_default():
        x = tf.compat.v1.placeholder(tf.float32, [None, 1], name="x")
        y = tf.compat.v1.placeholder(tf.float32, [None, 1], name="y")
        w = tf.compat.v1.get_variable("w", [1, 1], initializer=tf.compat.v1.zeros_initializer())
        loss = tf.reduce_mean(tf.square(tf.matmul(x, w) - y), name="loss")
        train = tf.compat.v1.train.GradientDescentOptimizer(0.1).minimize(loss)
        init = tf.compat.v1.global_variables_initializer()
    xs = np.linspace(0, 1, 16, dtype=np.float32).reshape(-1, 1)
    return graph, {x: xs, y: 3 * xs}, loss, train, init


def trial(session, feed, loss, train, init, steps=30) -> list[float]:
    session.run(init)
    return [float(session.run([loss, train], feed)[0]) for _ in range(steps)]


def test_status_and_sessions(tfsd, client):
    status = tfsd.status()
    assert status.version
    assert status.pid > 0
    assert tfsd.sessions() == []
    created = client.create(experiment="lr-1")
    (listed,) = tfsd.sessions()
    assert listed.session_id == created.session_id
    assert listed.labels == {"experiment": "lr-1"}
    assert listed.state == "ready"
    assert listed.memory.private_bytes > 0
    assert not listed.is_master_session
    assert tfsd.session(created.session_id).worker_pid == created.worker_pid


def test_errors_carry_the_status_code(tfsd):
    import grpc

    with pytest.raises(tfsd_client.TfsdError) as raised:
        tfsd.purge("s-does-not-exist")
    assert raised.value.code == grpc.StatusCode.NOT_FOUND
    assert "s-does-not-exist" in raised.value.message


def test_resets_and_events(tfsd, client):
    graph, feed, loss, train, init = regression_graph()
    session_id = client.create(graph.as_graph_def().SerializeToString()).session_id
    with tfsd.watch(session_id, timeout=DEADLINE_S) as events:
        client.run(session_id, targets=[init.name])
        purged = tfsd.purge(session_id)
        assert purged.worker_pid_before == purged.worker_pid_after
        assert events.next_of("variables_purged").session_id == session_id
        recycled = tfsd.recycle(session_id)
        assert recycled.worker_pid_after != recycled.worker_pid_before
        event = events.next_of("recycled")
        assert event.worker_pid == recycled.worker_pid_after
        assert event.memory_after is not None
        reset = tfsd.reset_graph(session_id)
        assert reset.session.graph_version == 0
        assert events.next_of("graph_reset").session_id == session_id
        tfsd.close_session(session_id)
        assert events.next_of("closed").session_id == session_id


def test_a_tensorflow_session_found_by_name_and_fully_reset(daemon, tfsd):
    """The README's story: train through grpc://, then a fresh worker process between trials."""
    graph, feed, loss, train, init = regression_graph()
    config = tfsd_client.session_config("exp-1")
    with tf.compat.v1.Session(f"grpc://{daemon.master_address}", graph=graph, config=config) as sess:
        # TensorFlow's client creates its session on the daemon at the first run, not before;
        # the error says so.
        with pytest.raises(LookupError, match="creates its session on the daemon at its first"):
            tfsd.master_session("exp-1")
        first = trial(sess, feed, loss, train, init)

        session = tfsd.master_session("exp-1")
        assert session.is_master_session
        assert session.master_name == "exp-1"
        # session_config's default operation timeout reached the daemon.
        assert session.labels["tfsd.master.operation_timeout_ms"] == str(
            tfsd_client.DEFAULT_OPERATION_TIMEOUT_MS
        )
        assert tfsd.session_for_handle(session.session_id) == tfsd.session(session.session_id)
        assert tfsd.master_sessions("another-name") == []

        # "Fully reset my session": a fresh process, same handle; the client goes on.
        result = tfsd.recycle(tfsd.master_session("exp-1"))
        assert result.worker_pid_after != result.worker_pid_before
        assert result.variables_preserved == 0
        with pytest.raises(tf.errors.FailedPreconditionError):
            sess.run(loss, feed)
        second = trial(sess, feed, loss, train, init)

        # Two sessions of one name: master_session cannot choose, and names both.
        with tf.compat.v1.Session(
            f"grpc://{daemon.master_address}", graph=graph, config=config
        ) as twin:
            twin.run(init)
            with pytest.raises(LookupError, match="2 MasterService sessions") as raised:
                tfsd.master_session("exp-1")
            for found in tfsd.master_sessions("exp-1"):
                assert found.session_id in str(raised.value)
    np.testing.assert_allclose(second, first, rtol=1e-6)
    assert first[-1] < first[0] / 10
    assert tfsd.master_sessions() == []


def test_session_config_sets_an_operation_timeout():
    default = tfsd_client.session_config("exp-1")
    assert default.experimental.session_metadata.name == "exp-1"
    assert default.operation_timeout_in_ms == tfsd_client.DEFAULT_OPERATION_TIMEOUT_MS == 600_000
    # A config that sets its own keeps it, and everything else it sets; it is not changed.
    own = tf.compat.v1.ConfigProto(operation_timeout_in_ms=5_000, inter_op_parallelism_threads=2)
    kept = tfsd_client.session_config("exp-1", own)
    assert (kept.operation_timeout_in_ms, kept.inter_op_parallelism_threads) == (5_000, 2)
    assert own.experimental.session_metadata.name == ""
    # The keyword wins; 0 is no timeout (TensorFlow's default).
    unlimited = tfsd_client.session_config("exp-1", own, operation_timeout_ms=0)
    assert unlimited.operation_timeout_in_ms == 0
    chosen = tfsd_client.session_config("exp-1", operation_timeout_ms=1_234)
    assert chosen.operation_timeout_in_ms == 1_234
    with pytest.raises(ValueError, match="operation_timeout_ms"):
        tfsd_client.session_config("exp-1", operation_timeout_ms=-1)


def test_the_operation_timeout_stops_a_client_of_a_dead_daemon():
    """Without an operation timeout TensorFlow's client waits for a dead server forever (it
    still waited after 60 s when this was written); with session_config's it fails in time."""

    daemon = Daemon()
    graph = tf.Graph()
    with graph.as_default():
        x = tf.compat.v1.placeholder(tf.float32, [], name="x")
        doubled = 2 * x
    config = tfsd_client.session_config("doomed", operation_timeout_ms=2_000)
    sess = tf.compat.v1.Session(f"grpc://{daemon.master_address}", graph=graph, config=config)
    assert sess.run(doubled, {x: 1.0}) == 2.0
    daemon.kill()
    outcome: dict[str, BaseException] = {}

    def step() -> None:
        try:
            sess.run(doubled, {x: 2.0})
        except BaseException as error:  # handed to the test's thread
            outcome["error"] = error

    # In a thread: if the client hangs, the test fails instead of hanging with it.
    runner = threading.Thread(target=step, daemon=True)
    runner.start()
    runner.join(DEADLINE_S)
    assert not runner.is_alive(), f"sess.run still waits {DEADLINE_S:.0f} s after the kill"
    assert isinstance(outcome.get("error"), tf.errors.DeadlineExceededError), outcome
    with contextlib.suppress(tf.errors.OpError):
        sess.close()  # CloseSession to a dead daemon: fails too, after the same timeout


def test_a_tfsd_v1_session_is_not_a_master_session(tfsd, client):
    created = client.create()
    with pytest.raises(LookupError):
        tfsd.session_for_handle(created.session_id)
    with pytest.raises(LookupError):
        tfsd.master_session("exp-1")


def test_a_bearer_token_authenticates(tmp_path):
    import hashlib

    import grpc

    token = "s3cret-token"
    digest = hashlib.sha256(token.encode()).hexdigest()
    config = tmp_path / "tfsd.toml"
    config.write_text(
        f'[[auth.tokens]]\nprincipal = "ops"\nrole = "operator"\nsha256 = "{digest}"\n'
    )
    daemon = Daemon("--config", str(config))
    try:
        with tfsd_client.connect(daemon.address, token=token, timeout=DEADLINE_S) as tfsd:
            assert tfsd.sessions() == []
            with tfsd.watch(timeout=DEADLINE_S) as events:
                events.close()
        with tfsd_client.connect(daemon.address, timeout=DEADLINE_S) as anonymous:
            with pytest.raises(tfsd_client.TfsdError) as raised:
                anonymous.sessions()
            assert raised.value.code == grpc.StatusCode.UNAUTHENTICATED
    finally:
        assert daemon.stop() == 0
