"""A typed client for tfsd.v1: sessions, resets, events, MasterService sessions, and Python
sessions (`Tfsd.run_isolated`, `Tfsd.python_session`).

Nothing here imports TensorFlow or Keras: the stubs are built from `control_pb2` (the tfsd.v1
messages without tensors), and `tfsd_pb2`, which imports TensorFlow's tensor_pb2, is imported
only by `_stubs()`, for callers that need the tensor-carrying messages.
"""

from __future__ import annotations

import codecs
import datetime as _dt
import pickle
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, Callable, TypeVar, Union

import grpc

_T = TypeVar("_T")

if TYPE_CHECKING:
    from tensorflow.core.protobuf import config_pb2

DEFAULT_ADDRESS = "127.0.0.1:50051"
DEFAULT_TIMEOUT_S = 60.0
# The operation timeout `session_config` gives a `tf.compat.v1.Session("grpc://…")`: 10
# minutes, longer than any one training step should take (see `session_config`).
DEFAULT_OPERATION_TIMEOUT_MS = 10 * 60 * 1000

# Labels the daemon puts on sessions created through TensorFlow's MasterService.
ORIGIN_LABEL = "tfsd.origin"
ORIGIN_MASTER = "master"
NAME_LABEL = "tfsd.master.name"
CLIENT_LABEL = "tfsd.master.client"
# The principal whose token created a MasterService session (`session_config(token=...)`).
PRINCIPAL_LABEL = "tfsd.master.principal"
# What starts the second line of `session_metadata.name` that carries a token.
TOKEN_PREFIX = "tfsd-token="

_CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", -1),
    ("grpc.max_receive_message_length", -1),
]
# For a `unix:PATH` address: since grpcio 1.57 (grpc/grpc#33571) the default `:authority` is
# the %-encoded socket path, which is no valid HTTP/2 authority, and the daemon's HTTP/2 layer
# (Rust's h2) resets every such stream with PROTOCOL_ERROR (grpc/grpc#38142). "localhost" is
# what grpc-go and Kubernetes send over Unix sockets.
UNIX_SOCKET_CHANNEL_OPTIONS = [("grpc.default_authority", "localhost")]


def _control():
    """The tfsd.v1 messages that carry no tensor (control.proto); needs only protobuf."""
    from tfsd_client._gen.tfsd.v1 import control_pb2

    return control_pb2


def _stubs():
    """The full generated tfsd.v1 modules, for the tensor-carrying messages (RunRequest,
    RunResponse). Importing them imports TensorFlow (tensor_pb2): the client itself never
    calls this."""
    from tfsd_client._gen.tfsd.v1 import tfsd_pb2, tfsd_pb2_grpc

    return tfsd_pb2, tfsd_pb2_grpc


_SERVICE = "/tfsd.v1.SessionService/"

# tfsd.v1.SessionService's methods (tfsd.proto), but Run, whose messages carry tensors:
# method -> (request, response, response is a stream). Messages are control.proto's.
_METHODS = {
    "CreateSession": ("CreateSessionRequest", "CreateSessionResponse", False),
    "ExtendGraph": ("ExtendGraphRequest", "ExtendGraphResponse", False),
    "ResetGraph": ("ResetGraphRequest", "ResetResponse", False),
    "PurgeVariables": ("PurgeVariablesRequest", "ResetResponse", False),
    "RecycleSession": ("RecycleSessionRequest", "ResetResponse", False),
    "CloseSession": ("CloseSessionRequest", "CloseSessionResponse", False),
    "GetSession": ("GetSessionRequest", "SessionInfo", False),
    "ListSessions": ("ListSessionsRequest", "ListSessionsResponse", False),
    "WatchEvents": ("WatchEventsRequest", "SessionEvent", True),
    "GetDaemonStatus": ("GetDaemonStatusRequest", "DaemonStatus", False),
    "Call": ("CallRequest", "CallEvent", True),
}


class _SessionStub:
    """SessionService's tensor-free methods as grpcio multi-callables (what the generated
    `SessionServiceStub` would hold, without importing tfsd_pb2 and so TensorFlow)."""

    def __init__(self, channel: grpc.Channel, pb2) -> None:
        for method, (request, response, streaming) in _METHODS.items():
            make = channel.unary_stream if streaming else channel.unary_unary
            callable_ = make(
                _SERVICE + method,
                request_serializer=getattr(pb2, request).SerializeToString,
                response_deserializer=getattr(pb2, response).FromString,
            )
            setattr(self, method, callable_)


class TfsdError(Exception):
    """A call the daemon refused: `code` is the gRPC status code, `message` its reason."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message

    def __reduce__(self):
        return (type(self), (self.code, self.message))


class RemoteError(Exception):
    """The code a Python session ran raised: `type_name` is its exception's qualified type
    (e.g. `builtins.ValueError`), `message` its str, `traceback` the traceback as the worker
    formatted it. Errors of tfsd itself (timeouts, memory limits, a dead worker) are
    `TfsdError`s instead."""

    def __init__(self, type_name: str, message: str, traceback: str) -> None:
        super().__init__(type_name, message, traceback)
        self.type_name = type_name
        self.message = message
        self.traceback = traceback

    def __str__(self) -> str:
        text = f"{self.type_name}: {self.message}" if self.message else self.type_name
        if self.traceback:
            text += "\n\nRemote traceback:\n" + self.traceback.rstrip("\n")
        return text


@dataclass(frozen=True)
class Memory:
    rss_bytes: int
    private_bytes: int
    gpu: dict[int, int] = field(default_factory=dict)
    """GPU memory of the worker's processes, bytes per device (NVML's index); empty without
    GPUs."""


_GENTLE_ACTIONS = ("purge_variables", "reset_graph")


@dataclass(frozen=True)
class MemoryPolicy:
    """What the daemon's memory policy does about one session (tfsd.v1 MemoryPolicy).

    Limits are bytes of private memory (RssAnon); 0 takes the daemon's default. Above
    `soft_limit_bytes`, between calls: the gentle action, then a recycle if that was not
    enough. Above `hard_limit_bytes`: a recycle at once, and a running call fails with
    TfsdError RESOURCE_EXHAUSTED. `gentle_action` is "purge_variables", "reset_graph" or None
    for the daemon's default; `preserve_variables` carries state over when the policy
    recycles. `gpu_soft_limit_bytes` and `gpu_hard_limit_bytes` hold the session's GPU memory
    (summed over its devices) the same way, except that a breach goes straight to a recycle: no
    reset gives a GPU allocator's pool back. Every limit is capped by the operator's maxima:
    `SessionInfo.memory_policy` has the effective values. `python_session(memory_policy=...)`
    also takes a dict with these keys."""

    soft_limit_bytes: int = 0
    hard_limit_bytes: int = 0
    gentle_action: str | None = None
    preserve_variables: bool = False
    gpu_soft_limit_bytes: int = 0
    gpu_hard_limit_bytes: int = 0

    def __post_init__(self) -> None:
        if self.gentle_action is not None and self.gentle_action not in _GENTLE_ACTIONS:
            raise ValueError(
                f"gentle_action must be one of {_GENTLE_ACTIONS} or None, "
                f"not {self.gentle_action!r}"
            )
        for name in (
            "soft_limit_bytes",
            "hard_limit_bytes",
            "gpu_soft_limit_bytes",
            "gpu_hard_limit_bytes",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be a non-negative int, not {value!r}")

    @classmethod
    def of(cls, policy: MemoryPolicy | Mapping[str, Any]) -> MemoryPolicy:
        """`policy` itself, or a MemoryPolicy from a dict of its fields (unknown keys are a
        TypeError)."""
        if isinstance(policy, MemoryPolicy):
            return policy
        if isinstance(policy, Mapping):
            known = {f.name for f in fields(cls)}
            unknown = sorted(set(policy) - known)
            if unknown:
                raise TypeError(f"unknown memory_policy keys {unknown}; known: {sorted(known)}")
            return cls(**policy)
        raise TypeError(f"memory_policy must be a MemoryPolicy or a dict, not {type(policy)}")


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
    runtime: str = "graph"
    """"graph" (a TensorFlow graph in a tfsd-worker) or "python" (a Python session)."""
    call_count: int = 0
    """Python sessions: calls made."""
    memory_policy: MemoryPolicy | None = None
    """The effective memory policy (limits 0 = none)."""
    owner: str = ""
    """The principal that owns the session: whose token created it (through tfsd.v1, or a
    TensorFlow client's `session_config(token=...)`); "" when nobody's (no `[auth]`, or a
    TensorFlow client without a token)."""

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
    warm_python_workers: int = 0
    """Python sessions' warm pool: ready interpreters, and the configured size (0 when the
    daemon has no Python sessions configured)."""
    warm_python_pool_size: int = 0
    python_runtime: str = ""
    """What a Python worker reported (Python, TensorFlow and Keras versions); empty until one
    has started."""
    gpu: str = ""
    """The GPUs the daemon sees ("1 GPU: 0 NVIDIA H200 (139.8 GiB)"), or why none ("no NVIDIA
    driver (...)")."""


SessionRef = Union[str, SessionInfo, "PythonSession"]


def _id(session: SessionRef) -> str:
    return session if isinstance(session, str) else session.session_id


def _enum_name(enum, value: int, prefix: str) -> str:
    name = enum.Name(value) if value in enum.values() else str(value)
    return name.removeprefix(prefix).lower()


def _time(timestamp) -> _dt.datetime:
    return timestamp.ToDatetime(tzinfo=_dt.timezone.utc)


def _memory(message) -> Memory:
    return Memory(
        rss_bytes=message.rss_bytes,
        private_bytes=message.private_bytes,
        gpu={usage.gpu: usage.used_bytes for usage in getattr(message, "gpu", ())},
    )


class Tfsd:
    """A connection to a tfsd daemon's tfsd.v1 API. Every call has a deadline (`timeout`).

    `address` is `HOST:PORT`, or `unix:PATH` for the daemon's Unix socket
    (`server.unix_socket`, e.g. `unix:/run/tfsd/tfsd.sock`; grpcio connects to it itself).
    There the daemon knows the caller's uid, which its `[[auth.peers]]` may map to a principal:
    no token needed.

    `token` is sent as `authorization: Bearer TOKEN` (the daemon's `[[auth.tokens]]`; it also
    works on the Unix socket, where it decides over the uid); `root_certificates` (PEM bytes)
    switches to TLS, for a daemon with `[tls]` (TCP only: the Unix socket is plaintext)."""

    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        *,
        timeout: float = DEFAULT_TIMEOUT_S,
        token: str | None = None,
        root_certificates: bytes | None = None,
    ):
        if address.startswith("unix:") and root_certificates is not None:
            raise ValueError(
                f"{address!r} is tfsd's Unix socket, which is served without TLS: leave out "
                "root_certificates (the kernel, not TLS, tells the daemon who connects there)"
            )
        self.address = address
        self.timeout = timeout
        self._pb2 = _control()
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None
        if root_certificates is None:
            options = _CHANNEL_OPTIONS
            if address.startswith("unix:"):
                options = options + UNIX_SOCKET_CHANNEL_OPTIONS
            self._channel = grpc.insecure_channel(address, options=options)
        else:
            credentials = grpc.ssl_channel_credentials(root_certificates=root_certificates)
            self._channel = grpc.secure_channel(address, credentials, options=_CHANNEL_OPTIONS)
        self._stub = _SessionStub(self._channel, self._pb2)

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
        runtime = _enum_name(self._pb2.Runtime, info.runtime, "RUNTIME_")
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
            runtime="graph" if runtime == "unspecified" else runtime,
            call_count=info.call_count,
            memory_policy=self._memory_policy(info.memory_policy)
            if info.HasField("memory_policy")
            else None,
            owner=info.owner,
        )

    def _memory_policy(self, policy) -> MemoryPolicy:
        action = _enum_name(self._pb2.GentleAction, policy.gentle_action, "GENTLE_ACTION_")
        return MemoryPolicy(
            soft_limit_bytes=policy.soft_limit_bytes,
            hard_limit_bytes=policy.hard_limit_bytes,
            gentle_action=action if action in _GENTLE_ACTIONS else None,
            preserve_variables=policy.preserve_variables,
            gpu_soft_limit_bytes=policy.gpu_soft_limit_bytes,
            gpu_hard_limit_bytes=policy.gpu_hard_limit_bytes,
        )

    def _memory_policy_message(self, policy: MemoryPolicy | Mapping[str, Any]):
        policy = MemoryPolicy.of(policy)
        action = "GENTLE_ACTION_" + (policy.gentle_action or "unspecified").upper()
        return self._pb2.MemoryPolicy(
            soft_limit_bytes=policy.soft_limit_bytes,
            hard_limit_bytes=policy.hard_limit_bytes,
            gentle_action=self._pb2.GentleAction.Value(action),
            preserve_variables=policy.preserve_variables,
            gpu_soft_limit_bytes=policy.gpu_soft_limit_bytes,
            gpu_hard_limit_bytes=policy.gpu_hard_limit_bytes,
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
        """The one live MasterService session named `name` (`session_config(name)`).

        TensorFlow's client creates its session on the daemon at its first `run` (or
        `list_devices`), not when `tf.compat.v1.Session(...)` returns: call this after the
        session's first `sess.run`. LookupError if there is no such session, or more than one
        (`master_sessions(name)` lists them all)."""
        found = self.master_sessions(name)
        if not found:
            raise LookupError(
                f"no MasterService session is named {name!r}: TensorFlow's client creates its "
                "session on the daemon at its first run, so call master_session after the "
                "first sess.run of a tf.compat.v1.Session created with "
                f"config=tfsd_client.session_config({name!r})"
            )
        if len(found) > 1:
            ids = ", ".join(session.session_id for session in found)
            raise LookupError(
                f"{len(found)} MasterService sessions are named {name!r} ({ids}); give each "
                "session a name of its own, or pick one from master_sessions(name)"
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
            warm_python_workers=status.warm_python_workers,
            warm_python_pool_size=status.warm_python_pool_size,
            python_runtime=status.python_runtime,
            gpu=getattr(status, "gpu", ""),
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

    # --- Python sessions -------------------------------------------------------------------

    def python_session(
        self,
        labels: Mapping[str, str] | None = None,
        memory_policy: MemoryPolicy | Mapping[str, Any] | None = None,
        timeout: float | None = None,
        gpus: str | Sequence[int] = "any",
    ) -> PythonSession:
        """A new Python session: one of the daemon's warm Python interpreters (TensorFlow and
        Keras already imported), kept until `close()` (or the end of a `with` block).

        `labels` are free-form labels for operators; `memory_policy` a `MemoryPolicy` or a
        dict of its fields (`{"soft_limit_bytes": ..., "hard_limit_bytes": ...}`); `timeout`
        the default limit for each `call`, in seconds (None: no limit; see
        `PythonSession.timeout`). `gpus` is which GPUs the session's worker may use: "any"
        (those its pool's workers see), "none", or a list of device indices (nvidia-smi's
        order), which gets a worker started for the session when it differs from the pool's.
        Fails with TfsdError (FAILED_PRECONDITION, UNAVAILABLE...)
        when the daemon has no Python sessions configured or cannot start one."""
        request = self._pb2.CreateSessionRequest(
            labels=dict(labels or {}), runtime=self._pb2.RUNTIME_PYTHON
        )
        if memory_policy is not None:
            request.memory_policy.CopyFrom(self._memory_policy_message(memory_policy))
        if gpus == "none":
            request.gpus.none = True
        elif gpus != "any":
            if isinstance(gpus, str) or not all(
                isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in gpus
            ):
                raise ValueError(
                    f'gpus must be "any", "none" or a list of GPU indices, not {gpus!r}'
                )
            request.gpus.devices.extend(gpus)
        info = self._session(self._call("CreateSession", request).session)
        return PythonSession(self, info.session_id, timeout=timeout)

    def run_isolated(self, fn: Callable[..., _T], /, *args: Any, **kwargs: Any) -> _T:
        """`fn(*args, **kwargs)`, run in a fresh Python session that is closed afterwards
        (also when the call fails or is interrupted), so nothing it leaves behind - memory,
        graphs, threads - outlives it. Returns what `fn` returned; raises `RemoteError` if it
        raised, `TfsdError` if tfsd failed. Its stdout and stderr are copied to this process's
        `sys.stdout` and `sys.stderr` as it writes them.

        Every argument goes to `fn`; for labels, a memory policy or a timeout, use
        `python_session(...)` and `call`. `fn`, its arguments and its result travel by
        cloudpickle (see `PythonSession.call`).

        The call asks the daemon to close the session when it ends however it ends
        (`close_session_after`), so nothing is left behind even if this process dies; the
        client closes it too before returning, so it is gone when this returns."""
        session = self.python_session()
        try:
            result = session._call(fn, args, kwargs, close_session_after=True)
        except BaseException:
            session._close_quietly()
            raise
        session.close()
        return result

    def _run_call(self, request, timeout: float | None):
        """Runs one Call: copies Output events to sys.stdout/sys.stderr as they arrive and
        returns the CallResult, or raises RemoteError / TfsdError."""
        if timeout is not None:
            if timeout <= 0:
                raise ValueError(f"timeout must be positive or None, not {timeout!r}")
            request.timeout_ms = max(1, round(timeout * 1000))
            # The daemon enforces timeout_ms and answers DEADLINE_EXCEEDED itself; the gRPC
            # deadline, later, only guards against a daemon that does not answer at all.
            deadline = timeout + self.timeout
        else:
            deadline = None
        output = _Output(self._pb2)
        result = exception = None
        stream = self._stub.Call(request, timeout=deadline, metadata=self._metadata)
        try:
            for event in stream:
                kind = event.WhichOneof("event")
                if kind == "output":
                    output.write(event.output)
                elif kind == "result":
                    result = event.result
                elif kind == "exception":
                    exception = event.exception
        except grpc.RpcError as error:
            raise TfsdError(error.code(), error.details() or "") from None
        except BaseException:
            # KeyboardInterrupt (or an error writing the output): stop the call in the daemon.
            stream.cancel()
            raise
        finally:
            output.flush()
        if exception is not None:
            raise RemoteError(exception.type_name, exception.message, exception.traceback)
        if result is None:
            raise TfsdError(grpc.StatusCode.INTERNAL, "the Call stream ended without a result")
        return result


class _Output:
    """Copies a call's Output events to this process's sys.stdout / sys.stderr (looked up at
    each write, so redirections and pytest's capture apply), decoding UTF-8 incrementally so
    that a character split across two events comes out whole."""

    def __init__(self, pb2) -> None:
        self._streams = {pb2.STREAM_STDOUT: "stdout", pb2.STREAM_STDERR: "stderr"}
        self._decoders = {
            name: codecs.getincrementaldecoder("utf-8")(errors="replace")
            for name in self._streams.values()
        }

    def write(self, output) -> None:
        name = self._streams.get(output.stream, "stdout")
        text = self._decoders[name].decode(output.data)
        if text:
            target = getattr(sys, name)
            target.write(text)
            target.flush()

    def flush(self) -> None:
        for name, decoder in self._decoders.items():
            text = decoder.decode(b"", final=True)
            if text:
                getattr(sys, name).write(text)
            getattr(sys, name).flush()


class PythonSession:
    """A Python session (`Tfsd.python_session`): a Python interpreter of the daemon's, with
    TensorFlow and Keras already imported, that runs this client's functions. State kept in the
    interpreter (e.g. `tfsd_worker.state`, module globals, Keras models) lasts from one `call`
    to the next until a reset or `close()`."""

    def __init__(self, tfsd: Tfsd, session_id: str, *, timeout: float | None = None) -> None:
        self._tfsd = tfsd
        self.session_id = session_id
        self.timeout = timeout
        """The limit for each `call` and `run_script`, in seconds (None: none). When it runs
        out the daemon interrupts the code (and replaces the interpreter if it does not stop;
        the session stays usable) and the call raises TfsdError DEADLINE_EXCEEDED. The daemon
        caps it at its limits.max_run_timeout. May be changed between calls."""
        self._closed = False

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<PythonSession {self.session_id} ({state}) at {self._tfsd.address}>"

    @property
    def closed(self) -> bool:
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"Python session {self.session_id} is closed")

    def call(self, fn: Callable[..., _T], /, *args: Any, **kwargs: Any) -> _T:
        """`fn(*args, **kwargs)` in this session's interpreter; returns its result, or raises
        `RemoteError` if it raised and `TfsdError` if tfsd failed (DEADLINE_EXCEEDED after
        `timeout`, RESOURCE_EXHAUSTED when the hard memory limit stopped it, UNAVAILABLE when
        the interpreter died). Its stdout and stderr are copied to this process's as they are
        written.

        `fn`, `args` and `kwargs` travel as `cloudpickle.dumps((fn, args, kwargs))`: functions
        defined in `__main__` or a notebook travel by value, importable ones by reference (the
        daemon's interpreter must be able to import them; for a module of your own, use
        `cloudpickle.register_pickle_by_value(module)`). The result comes back by pickle, so
        it must be something this process can unpickle: return plain Python or numpy values,
        not TensorFlow tensors or Keras objects, for a client without TensorFlow."""
        return self._call(fn, args, kwargs)

    def _call(self, fn, args, kwargs, *, close_session_after: bool = False):
        self._check_open()
        import cloudpickle  # on first use: not needed for control calls

        request = self._tfsd._pb2.CallRequest(
            session_id=self.session_id,
            pickled=cloudpickle.dumps((fn, args, kwargs)),
            close_session_after=close_session_after,
        )
        result = self._tfsd._run_call(request, self.timeout)
        return pickle.loads(result.pickled) if result.pickled else None

    def run_script(
        self, source: str | bytes, *, path: str = "<script>", argv: tuple[str, ...] | list[str] = ()
    ) -> int:
        """Runs `source` as `__main__` in this session's interpreter, as `python path argv...`
        would; returns its exit status (its SystemExit code, 0 when it ran to the end). Output,
        errors and `timeout` as for `call`."""
        self._check_open()
        pb2 = self._tfsd._pb2
        if isinstance(source, str):
            source = source.encode()
        script = pb2.Script(path=path, source=source, argv=list(argv))
        request = pb2.CallRequest(session_id=self.session_id, script=script)
        return self._tfsd._run_call(request, self.timeout).exit_code

    def info(self) -> SessionInfo:
        """The session as the daemon sees it: worker pid, memory, call count, ..."""
        return self._tfsd.session(self.session_id)

    def reset_graph(self) -> ResetResult:
        """Same interpreter; TensorFlow's and Keras's global state cleared
        (`keras.backend.clear_session()`, `tf.compat.v1.reset_default_graph()`) and garbage
        collected. `tfsd_worker.state` is kept, and so is what it holds. The result has the
        worker's memory before and after."""
        return self._tfsd.reset_graph(self.session_id)

    def purge_variables(self) -> ResetResult:
        """Same interpreter; `tfsd_worker.state` emptied, then what `reset_graph` does."""
        return self._tfsd.purge(self.session_id)

    def recycle(self, *, preserve_variables: bool = False) -> ResetResult:
        """A fresh interpreter for this session (the old process exits, every byte of it goes
        back to the system). With `preserve_variables`, `tfsd_worker.state` is carried over
        (Keras models in Keras' saving format, the rest by cloudpickle; something that
        cannot travel fails the recycle with FAILED_PRECONDITION naming it), and
        `variables_preserved` counts its names."""
        return self._tfsd.recycle(self.session_id, preserve_variables=preserve_variables)

    def close(self) -> None:
        """Closes the session and its interpreter. Idempotent; a session the daemon no longer
        has (NOT_FOUND) counts as closed."""
        if self._closed:
            return
        try:
            self._tfsd.close_session(self.session_id)
        except TfsdError as error:
            if error.code != grpc.StatusCode.NOT_FOUND:
                raise
        self._closed = True

    def _close_quietly(self) -> None:
        # While another exception propagates: close, but never replace that exception.
        try:
            self.close()
        except Exception:
            pass

    def __enter__(self) -> PythonSession:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._close_quietly()


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
    """A client of the tfsd.v1 API at `address` (`HOST:PORT`, or `unix:PATH` for the daemon's
    Unix socket); see `Tfsd` for `token` and `root_certificates`."""
    return Tfsd(address, timeout=timeout, token=token, root_certificates=root_certificates)


def session_config(
    name: str | None = None,
    config: "config_pb2.ConfigProto | None" = None,
    *,
    operation_timeout_ms: int | None = None,
    token: str | None = None,
) -> "config_pb2.ConfigProto":
    """A ConfigProto for a `tf.compat.v1.Session("grpc://…")` on tfsd: named, so that
    `Tfsd.master_session(name)` finds it, with an operation timeout, so that the client never
    waits forever, and with the client's token where the daemon requires credentials.
    `config` (copied, never changed) carries any other settings.

    The name goes in TensorFlow's own field for it, `experimental.session_metadata.name`;
    tfsd records it as the label `tfsd.master.name`. `name=None` leaves the session unnamed.

    `token` is one of the daemon's `[[auth.tokens]]`, the same a tfsd.v1 client sends
    (`connect(address, token=...)`): the session is then owned by that token's principal, who
    sees it in `Tfsd.sessions()`. TensorFlow's client sends no credentials of its own, only
    this ConfigProto with the session's creation, so the token travels there, on a second line
    of `session_metadata.name` (`NAME\ntfsd-token=TOKEN`); tfsd takes it off before anything
    else sees the config. Keep the returned config as private as the token. Later calls name
    the session by its handle, which TensorFlow's client keeps (docs/MASTER_SERVICE.md,
    "Credentials").

    `operation_timeout_ms` sets `operation_timeout_in_ms`: None (the default) keeps the one
    `config` sets, and otherwise uses `DEFAULT_OPERATION_TIMEOUT_MS` (10 minutes); 0 sets
    none (TensorFlow's own default).

    Why a default: without it, TensorFlow's client gives its calls to the server no deadline
    and waits for the server to be ready, so a client whose daemon died, hangs or never
    listened blocks in `sess.run` forever. With it, a call fails with `DeadlineExceededError`
    once the timeout has passed (and a daemon that restarts within it, with durable sessions,
    is simply waited for). The same value is also every step's timeout: TensorFlow's client
    sends it with each `run` that sets no `RunOptions.timeout_in_ms` of its own, and tfsd
    stops the step when it runs out. So it must be longer than any real step. One step of
    TF1 or graph-mode Keras training is one batch, milliseconds to seconds; 10 minutes leaves
    a hundredfold margin for a slow step and covers a first run that waits for a worker to
    start (the daemon's `workers.start_wait`, 2 minutes). For longer steps (e.g. a whole
    evaluation in one `run`) pass a longer timeout, 0, or
    `tf.compat.v1.RunOptions(timeout_in_ms=...)` for that step.
    """
    import tensorflow as tf

    if operation_timeout_ms is not None and (
        not isinstance(operation_timeout_ms, int)
        or isinstance(operation_timeout_ms, bool)
        or operation_timeout_ms < 0
    ):
        raise ValueError(
            "operation_timeout_ms must be a non-negative int or None, "
            f"not {operation_timeout_ms!r}"
        )
    if name is not None and (not isinstance(name, str) or "\n" in name):
        raise ValueError(f"name must be a str without a newline, not {name!r}")
    if token is not None and (
        not isinstance(token, str) or not token.strip() or any(c in token for c in "\r\n")
    ):
        # Never quoted: it may be a real token with a stray newline.
        raise ValueError("token must be a non-empty str on one line")
    named = tf.compat.v1.ConfigProto()
    if config is not None:
        named.CopyFrom(config)
    metadata = named.experimental.session_metadata
    if name is not None:
        metadata.name = name
    if token is not None:
        # A name `config` brought along keeps its place on the first line.
        own_name = metadata.name.split("\n", 1)[0]
        metadata.name = f"{own_name}\n{TOKEN_PREFIX}{token.strip()}"
    if operation_timeout_ms is not None:
        named.operation_timeout_in_ms = operation_timeout_ms
    elif named.operation_timeout_in_ms <= 0:
        named.operation_timeout_in_ms = DEFAULT_OPERATION_TIMEOUT_MS
    return named
