"""Python clients over the daemon's Unix socket (`server.unix_socket`, address `unix:PATH`):
grpcio's own channel with the generated stubs, and the `tfsd_client` package."""

from __future__ import annotations

import os
import stat

import grpc
import numpy as np
import pytest

from conftest import CHANNEL_OPTIONS, DEADLINE_S, Client, Daemon

tf = pytest.importorskip("tensorflow")
tfsd_client = pytest.importorskip("tfsd_client")


@pytest.fixture
def socket_daemon(tmp_path):
    socket = tmp_path / "tfsd.sock"
    config = tmp_path / "tfsd.toml"
    config.write_text(f'[server]\nunix_socket = "{socket}"\nunix_socket_mode = "0600"\n')
    started = Daemon("--config", str(config))
    try:
        yield started, socket
    finally:
        code = started.stop()
    assert code == 0, f"tfsd exited with {code} after SIGTERM"
    assert not socket.exists(), "the socket file is removed at exit"


def identity_graph() -> bytes:
    graph = tf.Graph()
    with graph.as_default():
        x = tf.compat.v1.placeholder(tf.float32, [None], name="x")
        tf.identity(x, name="y")
    return graph.as_graph_def().SerializeToString()


def test_grpcio_and_tfsd_client_over_the_unix_socket(socket_daemon, api):
    daemon, socket = socket_daemon
    assert f"tfsd socket on unix:{socket}" in daemon.stdout_lines
    mode = os.stat(socket).st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600

    address = f"unix:{socket}"
    # grpcio's own default authority for a Unix socket (the %-encoded path) is refused by the
    # daemon's HTTP/2 layer: a plain grpcio channel passes the option tfsd_client passes.
    options = CHANNEL_OPTIONS + tfsd_client.client.UNIX_SOCKET_CHANNEL_OPTIONS
    with grpc.insecure_channel(address, options=options) as channel:
        grpc.channel_ready_future(channel).result(timeout=DEADLINE_S)
        client = Client(api, api.grpc.SessionServiceStub(channel))
        session = client.create(identity_graph(), experiment="uds")
        # 16 MiB of float32, every bit pattern checked.
        fed = np.random.default_rng(7).standard_normal(4 << 20).astype(np.float32)
        (fetched,) = client.run(
            session.session_id, {"x": tf.make_tensor_proto(fed)}, fetches=["y"]
        )
        assert fetched.dtype == np.float32 and fetched.tobytes() == fed.tobytes()

    with tfsd_client.connect(address, timeout=DEADLINE_S) as tfsd:
        assert tfsd.address == address
        assert tfsd.status().pid == daemon.pid
        (listed,) = tfsd.sessions()
        assert listed.session_id == session.session_id
        assert listed.labels == {"experiment": "uds"}
        recycled = tfsd.recycle(session.session_id)
        assert recycled.worker_pid_before == session.worker_pid
        assert recycled.worker_pid_after != session.worker_pid
        tfsd.close_session(session.session_id)
        assert tfsd.sessions() == []


def test_tls_is_refused_for_a_unix_socket_address(tmp_path):
    with pytest.raises(ValueError, match="served without TLS"):
        tfsd_client.connect(f"unix:{tmp_path / 'tfsd.sock'}", root_certificates=b"PEM")
