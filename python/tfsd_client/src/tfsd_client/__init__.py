"""tfsd-client: control calls for tfsd, the TensorFlow session daemon.

    import tfsd_client
    tfsd = tfsd_client.connect("127.0.0.1:50051")
    for session in tfsd.sessions():
        print(session.session_id, session.memory.private_bytes)
    tfsd.recycle(tfsd.master_session("exp-1"))

A TensorFlow client that trains through `tf.compat.v1.Session("grpc://127.0.0.1:2222")` gets a
tfsd session of its own; name it with `session_config("exp-1")` to find it again.
"""

from tfsd_client.client import (
    CLIENT_LABEL,
    DEFAULT_ADDRESS,
    NAME_LABEL,
    ORIGIN_LABEL,
    ORIGIN_MASTER,
    DaemonStatus,
    Event,
    Events,
    Memory,
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
    "NAME_LABEL",
    "ORIGIN_LABEL",
    "ORIGIN_MASTER",
    "DaemonStatus",
    "Event",
    "Events",
    "Memory",
    "ResetResult",
    "SessionInfo",
    "Tfsd",
    "TfsdError",
    "connect",
    "session_config",
]
