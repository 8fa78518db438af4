"""TensorFlow's own client on a tfsd that requires credentials: `tf.compat.v1.Session` with
`tfsd_client.session_config(name, token=...)` (docs/MASTER_SERVICE.md, "Credentials").

The token travels in the only thing of its own TensorFlow's client sends, the ConfigProto of
CreateSession; the session is then the token's principal's, as one created through tfsd.v1
would be. Without a token, or with a wrong one, the client gets UnauthenticatedError saying
how to send one, unless the operator lets clients without credentials in.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from conftest import DEADLINE_S, Daemon

tf = pytest.importorskip("tensorflow")
tfsd_client = pytest.importorskip("tfsd_client")

ALICE = "alice-tf-client-token-0001"
BOB = "bob-tf-client-token-0002"
OPS = "ops-tf-client-token-0003"


def credentials_config(path, extra: str = "") -> str:
    """A config with alice and bob (clients) and ops (operator), by their SHA-256."""

    def digest(token: str) -> str:
        return hashlib.sha256(token.encode()).hexdigest()

    path.write_text(
        extra
        + f'[[auth.tokens]]\nprincipal = "alice"\nsha256 = "{digest(ALICE)}"\n'
        + f'[[auth.tokens]]\nprincipal = "bob"\nsha256 = "{digest(BOB)}"\n'
        + f'[[auth.tokens]]\nprincipal = "ops"\nrole = "operator"\nsha256 = "{digest(OPS)}"\n'
    )
    return str(path)


@pytest.fixture
def auth_daemon(tmp_path):
    started = Daemon("--config", credentials_config(tmp_path / "tfsd.toml"))
    try:
        yield started
    finally:
        code = started.stop()
    assert code == 0, f"tfsd exited with {code} after SIGTERM"


@pytest.fixture
def open_daemon(tmp_path):
    """Credentials configured, and master.allow_unauthenticated = true."""
    config = credentials_config(
        tmp_path / "tfsd.toml", "[master]\nallow_unauthenticated = true\n"
    )
    started = Daemon("--config", config)
    try:
        yield started
    finally:
        code = started.stop()
    assert code == 0, f"tfsd exited with {code} after SIGTERM"


def counter_graph():
    """w = 1.0; w_add: w += x."""
    graph = tf.Graph()
    with graph.as_default():
        x = tf.compat.v1.placeholder(tf.float32, [], name="x")
        w = tf.compat.v1.get_variable("w", [], initializer=tf.compat.v1.ones_initializer())
        add = tf.compat.v1.assign_add(w, x, name="w_add")
        init = tf.compat.v1.global_variables_initializer()
    return graph, x, w, add, init


def connect(daemon, token: str):
    return tfsd_client.connect(daemon.address, token=token, timeout=DEADLINE_S)


def test_without_a_token_the_client_is_told_how_to_send_one(auth_daemon):
    graph, _, w, _, init = counter_graph()
    config = tfsd_client.session_config("no-token", operation_timeout_ms=int(DEADLINE_S * 1000))
    with tf.compat.v1.Session(f"grpc://{auth_daemon.master_address}", graph=graph,
                              config=config) as sess:
        with pytest.raises(tf.errors.UnauthenticatedError) as raised:
            sess.run(init)
    message = str(raised.value)
    assert "requires credentials" in message, message
    assert "tfsd_client.session_config(NAME, token=TOKEN)" in message, message
    with connect(auth_daemon, OPS) as tfsd:
        assert tfsd.master_sessions() == []


def test_a_wrong_token_is_unauthenticated(auth_daemon):
    graph, _, _, _, init = counter_graph()
    wrong = "not-a-real-token-000000"
    config = tfsd_client.session_config(
        "wrong", token=wrong, operation_timeout_ms=int(DEADLINE_S * 1000)
    )
    with tf.compat.v1.Session(f"grpc://{auth_daemon.master_address}", graph=graph,
                              config=config) as sess:
        with pytest.raises(tf.errors.UnauthenticatedError) as raised:
            sess.run(init)
    message = str(raised.value)
    assert "not valid" in message, message
    assert wrong not in message


def test_with_its_token_the_session_is_the_principals(auth_daemon):
    graph, x, w, add, init = counter_graph()
    config = tfsd_client.session_config("exp-1", token=ALICE)
    target = f"grpc://{auth_daemon.master_address}"
    with tf.compat.v1.Session(target, graph=graph, config=config) as sess:
        sess.run(init)
        sess.run(add, {x: 2.0})
        assert sess.run(w) == pytest.approx(3.0)

        with connect(auth_daemon, ALICE) as alice:
            session = alice.master_session("exp-1")
            assert session.owner == "alice"
            assert session.labels[tfsd_client.PRINCIPAL_LABEL] == "alice"
            assert all(ALICE not in value for value in session.labels.values())
            assert [s.session_id for s in alice.sessions()] == [session.session_id]
            # Hers to act on through tfsd.v1: a fresh process, the client none the wiser.
            alice.recycle(session, preserve_variables=True)
        assert sess.run(w) == pytest.approx(3.0)
        sess.run(add, {x: np.float32(1.0)})
        assert sess.run(w) == pytest.approx(4.0)

        with connect(auth_daemon, BOB) as bob:
            assert bob.sessions() == [], "not bob's"
            with pytest.raises(LookupError):
                bob.master_session("exp-1")
        with connect(auth_daemon, OPS) as ops:
            assert ops.master_session("exp-1").owner == "alice"
    with connect(auth_daemon, ALICE) as alice:
        assert alice.sessions() == [], "closed with the TensorFlow session"


def test_allow_unauthenticated_lets_the_plain_client_in(open_daemon):
    graph, x, w, add, init = counter_graph()
    with tf.compat.v1.Session(f"grpc://{open_daemon.master_address}", graph=graph) as sess:
        sess.run(init)
        sess.run(add, {x: 5.0})
        assert sess.run(w) == pytest.approx(6.0)
        with connect(open_daemon, OPS) as ops:
            (session,) = ops.master_sessions()
            assert session.owner == "", "no credentials, no owner"
        with connect(open_daemon, ALICE) as alice:
            assert alice.sessions() == []


def test_session_config_carries_the_token_apart_from_the_name():
    config = tfsd_client.session_config("exp-1", token=f"  {ALICE}  ")
    assert config.experimental.session_metadata.name == f"exp-1\ntfsd-token={ALICE}"
    # A name the given config brings keeps its place; a new token replaces an old one.
    again = tfsd_client.session_config(None, config, token=BOB)
    assert again.experimental.session_metadata.name == f"exp-1\ntfsd-token={BOB}"
    unnamed = tfsd_client.session_config(token=ALICE)
    assert unnamed.experimental.session_metadata.name == f"\ntfsd-token={ALICE}"
    assert tfsd_client.session_config("plain").experimental.session_metadata.name == "plain"
    for bad in ("", "two\nlines"):
        with pytest.raises(ValueError) as raised:
            tfsd_client.session_config("exp-1", token=bad)
        assert "two" not in str(raised.value), "a token is never quoted"
    with pytest.raises(ValueError):
        tfsd_client.session_config("two\nlines")
