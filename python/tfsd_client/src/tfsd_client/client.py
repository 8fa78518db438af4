"""A typed client for tfsd.v1: sessions, resets, events, and MasterService sessions."""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Union

import grpc

if TYPE_CHECKING:
    from tensorflow.core.protobuf import config_pb2

DEFAULT_ADDRESS = "127.0.0.1:50051"
DEFAULT_TIMEOUT_S = 60.0

# Labels the daemon puts on sessions created through TensorFlow's MasterService.
ORIGIN_LABEL = "tfsd.origin"
ORIGIN_MASTER = "master"
NAME_LABEL = "tfsd.master.name"
CLIENT_LABEL = "tfsd.master.client"

_CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", -1),
    ("grpc.max_receive_message_length", -1),
]


def _stubs():
    # Imported on first use: the generated module needs TensorFlow's tensor_pb2.
    from tfsd_client._gen.tfsd.v1 import tfsd_pb2, tfsd_pb2_grpc

    return tfsd_pb2, tfsd_pb2_grpc


class TfsdError(Exception):
    """A call the daemon refused: `code` is the gRPC status code, `message` its reason."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Memory:
    rss_bytes: int
    private_bytes: int


@dataclass(frozen=True)
class SessionInfo:
    session_id: str
    labels: dict[str, str]
    state: str
    worker_pid: int
    memory: Memory
    graph_version: int
    run_count: int
    runs_in_flight: int
    graph_reset_count: int
    purge_count: int
    recycle_count: int
    worker_restart_count: int
    created_at: _dt.datetime
    last_used_at: _dt.datetime

    @property
    def is_master_session(self) -> bool:
        """Created by a TensorFlow client through the MasterService (`grpc://` target)."""
        return self.labels.get(ORIGIN_LABEL) == ORIGIN_MASTER

    @property
    def master_name(self) -> str | None:
        """The name the TensorFlow client gave it (`session_config(name)`), if any."""
        return self.labels.get(NAME_LABEL)


@dataclass(frozen=True)
class ResetResult:
    session: SessionInfo
    memory_before: Memory
    memory_after: Memory
    duration_s: float
    worker_pid_before: int
    worker_pid_after: int
    variables_preserved: int


@dataclass(frozen=True)
class Event:
    session_id: str
    kind: str
    """`created`, `extended`, `graph_reset`, `variables_purged`, `recycled`, `worker_exited`,
    `restored`, `closed`, `lagged`, ... (tfsd.v1 EventKind, lower case, without prefix)."""
    reason: str
    worker_pid: int
    graph_version: int
    at: _dt.datetime
    memory_before: Memory | None = None
    memory_after: Memory | None = None
    trigger: str = ""


@dataclass(frozen=True)
class DaemonStatus:
    version: str
    tensorflow_version: str
    pid: int
    memory: Memory
    session_count: int
    warm_workers: int
    warm_pool_size: int
    draining: bool
    extra: dict = field(default_factory=dict)


SessionRef = Union[str, SessionInfo]


def _id(session: SessionRef) -> str:
    return session.session_id if isinstance(session, SessionInfo) else session


def _enum_name(enum, value: int, prefix: str) -> str:
    name = enum.Name(value) if value in enum.values() else str(value)
    return name.removeprefix(prefix).lower()


def _time(timestamp) -> _dt.datetime:
    return timestamp.ToDatetime(tzinfo=_dt.timezone.utc)


def _memory(message) -> Memory:
    return Memory(rss_bytes=message.rss_bytes, private_bytes=message.private_bytes)


class Tfsd:
    """A connection to a tfsd daemon's tfsd.v1 API. Every call has a deadline (`timeout`).

    `token` is sent as `authorization: Bearer TOKEN` (the daemon's `[[auth.tokens]]`);
    `root_certificates` (PEM bytes) switches to TLS, for a daemon with `[tls]`."""

    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        *,
        timeout: float = DEFAULT_TIMEOUT_S,
        token: str | None = None,
        root_certificates: bytes | None = None,
    ):
        self.address = address
        self.timeout = timeout
        self._pb2, pb2_grpc = _stubs()
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None
        if root_certificates is None:
            self._channel = grpc.insecure_channel(address, options=_CHANNEL_OPTIONS)
        else:
            credentials = grpc.ssl_channel_credentials(root_certificates=root_certificates)
            self._channel = grpc.secure_channel(address, credentials, options=_CHANNEL_OPTIONS)
        self._stub = pb2_grpc.SessionServiceStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Tfsd:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _call(self, method: str, request):
        try:
            return getattr(self._stub, method)(
                request, timeout=self.timeout, metadata=self._metadata
            )
        except grpc.RpcError as error:
            raise TfsdError(error.code(), error.details() or "") from None

    # --- Conversions -----------------------------------------------------------------------

    def _session(self, info) -> SessionInfo:
        return SessionInfo(
            session_id=info.session_id,
            labels=dict(info.labels),
            state=_enum_name(self._pb2.SessionState, info.state, "SESSION_STATE_"),
            worker_pid=info.worker_pid,
            memory=_memory(info.memory),
            graph_version=info.graph_version,
            run_count=info.run_count,
            runs_in_flight=info.runs_in_flight,
            graph_reset_count=info.graph_reset_count,
            purge_count=info.purge_count,
            recycle_count=info.recycle_count,
            worker_restart_count=info.worker_restart_count,
            created_at=_time(info.created_at),
            last_used_at=_time(info.last_used_at),
        )

    def _reset(self, response) -> ResetResult:
        return ResetResult(
            session=self._session(response.session),
            memory_before=_memory(response.memory_before),
            memory_after=_memory(response.memory_after),
            duration_s=response.duration_us / 1e6,
            worker_pid_before=response.worker_pid_before,
            worker_pid_after=response.worker_pid_after,
            variables_preserved=response.variables_preserved,
        )

    def _event(self, event) -> Event:
        return Event(
            session_id=event.session_id,
            kind=_enum_name(self._pb2.EventKind, event.kind, "EVENT_KIND_"),
            reason=event.reason,
            worker_pid=event.worker_pid,
            graph_version=event.graph_version,
            at=_time(event.at),
            memory_before=_memory(event.memory_before) if event.HasField("memory_before") else None,
            memory_after=_memory(event.memory_after) if event.HasField("memory_after") else None,
            trigger=getattr(event, "trigger", ""),
        )

    # --- Sessions --------------------------------------------------------------------------

    def sessions(self) -> list[SessionInfo]:
        """Every session, oldest first."""
        response = self._call("ListSessions", self._pb2.ListSessionsRequest())
        return [self._session(info) for info in response.sessions]

    def session(self, session: SessionRef) -> SessionInfo:
        request = self._pb2.GetSessionRequest(session_id=_id(session))
        return self._session(self._call("GetSession", request))

    def master_sessions(self, name: str | None = None) -> list[SessionInfo]:
        """Sessions TensorFlow clients created through the MasterService, oldest first;
        with `name`, only those named so (`session_config(name)`)."""
        return [
            s
            for s in self.sessions()
            if s.is_master_session and (name is None or s.master_name == name)
        ]

    def master_session(self, name: str) -> SessionInfo:
        """The one live MasterService session named `name`; LookupError if there is none or
        more than one."""
        found = self.master_sessions(name)
        if len(found) != 1:
            raise LookupError(
                f"{len(found)} MasterService sessions are named {name!r}; expected exactly one"
            )
        return found[0]

    def session_for_handle(self, handle: str) -> SessionInfo:
        """The tfsd session behind a MasterService session handle (the handle *is* the
        session id; this checks that it is a MasterService session)."""
        info = self.session(handle)
        if not info.is_master_session:
            raise LookupError(f"session {handle} was not created through the MasterService")
        return info

    # --- Resets ----------------------------------------------------------------------------

    def purge(self, session: SessionRef) -> ResetResult:
        """Every variable uninitialised; same graph, same worker."""
        request = self._pb2.PurgeVariablesRequest(session_id=_id(session))
        return self._reset(self._call("PurgeVariables", request))

    def reset_graph(self, session: SessionRef) -> ResetResult:
        """An empty graph, no variables; same worker."""
        request = self._pb2.ResetGraphRequest(session_id=_id(session))
        return self._reset(self._call("ResetGraph", request))

    def recycle(self, session: SessionRef, *, preserve_variables: bool = False) -> ResetResult:
        """The session moves to a fresh worker process (every byte of the old one goes back to
        the system); its graph comes along, its variables only with `preserve_variables`."""
        request = self._pb2.RecycleSessionRequest(
            session_id=_id(session), preserve_variables=preserve_variables
        )
        return self._reset(self._call("RecycleSession", request))

    def close_session(self, session: SessionRef) -> None:
        self._call("CloseSession", self._pb2.CloseSessionRequest(session_id=_id(session)))

    # --- Daemon and events -----------------------------------------------------------------

    def status(self) -> DaemonStatus:
        status = self._call("GetDaemonStatus", self._pb2.GetDaemonStatusRequest())
        return DaemonStatus(
            version=status.version,
            tensorflow_version=status.tensorflow_version,
            pid=status.pid,
            memory=_memory(status.memory),
            session_count=status.session_count,
            warm_workers=status.warm_workers,
            warm_pool_size=status.warm_pool_size,
            draining=status.draining,
        )

    def watch(self, session: SessionRef | None = None, *, timeout: float | None = None) -> Events:
        """Lifecycle events (of one session, or of all) as they happen. Returns once the
        daemon has subscribed, so no event that happens after this call is missed. Iterating
        ends with TfsdError DEADLINE_EXCEEDED after `timeout` seconds; `close()` (or leaving
        a `with` block) stops it early."""
        request = self._pb2.WatchEventsRequest(session_id=_id(session) if session else "")
        stream = self._stub.WatchEvents(request, timeout=timeout, metadata=self._metadata)
        try:
            # The daemon subscribes before it answers with headers.
            stream.initial_metadata()
        except grpc.RpcError as error:
            raise TfsdError(error.code(), error.details() or "") from None
        return Events(self, stream)


class Events:
    """An iterator of `Event`s from `Tfsd.watch`."""

    def __init__(self, tfsd: Tfsd, stream) -> None:
        self._tfsd = tfsd
        self._stream = stream

    def __iter__(self) -> Events:
        return self

    def __next__(self) -> Event:
        try:
            return self._tfsd._event(next(self._stream))
        except grpc.RpcError as error:
            if error.code() == grpc.StatusCode.CANCELLED:
                raise StopIteration from None
            raise TfsdError(error.code(), error.details() or "") from None

    def next_of(self, kind: str, session: SessionRef | None = None) -> Event:
        """The next event of `kind` (of `session`, if given), skipping others."""
        for event in self:
            if event.kind == kind and (session is None or event.session_id == _id(session)):
                return event
        raise TfsdError(grpc.StatusCode.CANCELLED, f"the event stream ended before a {kind}")

    def close(self) -> None:
        self._stream.cancel()

    def __enter__(self) -> Events:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def connect(
    address: str = DEFAULT_ADDRESS,
    *,
    timeout: float = DEFAULT_TIMEOUT_S,
    token: str | None = None,
    root_certificates: bytes | None = None,
) -> Tfsd:
    """A client of the tfsd.v1 API at `address` (HOST:PORT); see `Tfsd` for `token` and
    `root_certificates`."""
    return Tfsd(address, timeout=timeout, token=token, root_certificates=root_certificates)


def session_config(
    name: str, config: "config_pb2.ConfigProto | None" = None
) -> "config_pb2.ConfigProto":
    """A ConfigProto that names a `tf.compat.v1.Session("grpc://…")` on tfsd, so that
    `Tfsd.master_session(name)` finds it. TensorFlow's own field for this is
    `experimental.session_metadata.name`; tfsd records it as the label `tfsd.master.name`.
    """
    import tensorflow as tf

    named = tf.compat.v1.ConfigProto()
    if config is not None:
        named.CopyFrom(config)
    named.experimental.session_metadata.name = name
    return named
