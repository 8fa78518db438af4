"""tfsd-client: the client of tfsd, the TensorFlow session daemon.

    import tfsd_client
    tfsd = tfsd_client.connect("127.0.0.1:50051")

    # Python sessions: your function, run in one of the daemon's warm interpreters
    # (TensorFlow and Keras already imported), in a fresh process that is closed afterwards.
    loss = tfsd.run_isolated(train, epochs=1)
    with tfsd.python_session(memory_policy={"hard_limit_bytes": 8 << 30}, timeout=600) as s:
        s.call(build_model)
        s.call(fit)
        s.recycle(preserve_variables=True)   # a fresh process, same tfsd_worker.state

    # Control calls.
    for session in tfsd.sessions():
        print(session.session_id, session.memory.private_bytes)
    tfsd.recycle(tfsd.master_session("exp-1"))   # after that session's first run

A TensorFlow client that trains through `tf.compat.v1.Session("grpc://127.0.0.1:2222")` gets a
tfsd session of its own at its first run; give it `config=session_config("exp-1")` to find it
again by that name (and an operation timeout, so that it never waits forever on a dead daemon);
where the daemon requires credentials, `session_config("exp-1", token=TOKEN)` also carries the
client's token, and the session is that token's principal's.

Neither TensorFlow nor Keras is imported by this package (only `session_config` imports
TensorFlow), so a client that runs Python sessions and control calls needs neither.
"""

from tfsd_client.client import (
    CLIENT_LABEL,
    DEFAULT_ADDRESS,
    DEFAULT_OPERATION_TIMEOUT_MS,
    NAME_LABEL,
    ORIGIN_LABEL,
    ORIGIN_MASTER,
    PRINCIPAL_LABEL,
    DaemonStatus,
    Event,
    Events,
    Memory,
    MemoryPolicy,
    PythonSession,
    RemoteError,
    ResetResult,
    SessionInfo,
    Tfsd,
    TfsdError,
    connect,
    session_config,
)

__all__ = [
    "CLIENT_LABEL",
    "DEFAULT_ADDRESS",
    "DEFAULT_OPERATION_TIMEOUT_MS",
    "NAME_LABEL",
    "ORIGIN_LABEL",
    "ORIGIN_MASTER",
    "PRINCIPAL_LABEL",
    "DaemonStatus",
    "Event",
    "Events",
    "Memory",
    "MemoryPolicy",
    "PythonSession",
    "RemoteError",
    "ResetResult",
    "SessionInfo",
    "Tfsd",
    "TfsdError",
    "connect",
    "session_config",
]
