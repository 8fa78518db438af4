"""The worker process: preload, Ready, then requests from the supervisor until it hangs up.

Threads:
  * the main thread preloads (TensorFlow, Keras), sends Ready, then runs the requests that
    touch the session one at a time, in arrival order: `call`, `reset_graph`,
    `purge_variables`, `export_state`, `import_state`. User code runs here, so TensorFlow and
    Keras get the main thread, and a cancel can interrupt it (SIGINT sent to this thread: a
    KeyboardInterrupt at the next bytecode, and a blocking sleep or wait is woken);
  * the reader thread reads frames and answers at once what needs no main thread: `cancel`,
    the graph requests (UNIMPLEMENTED) and requests it cannot read. At end of stream it ends
    the process (os._exit) whatever the main thread is doing.
Writes come from both (and from user threads printing during a call); Connection.send keeps
frames whole.

Frames that are not requests: one that does not decode as a WorkerRequest has no id to answer
with, so it is logged (stderr) and skipped; one longer than MAX_FRAME_BYTES cannot be skipped
without reading it, so the worker logs it and exits with status 1. End of stream: exit 0 at once.
Errors of the worker itself (not the user's code) are answered `error{code, message}` with
TensorFlow's status codes; a request the Python runtime does not implement is UNIMPLEMENTED.
"""

from __future__ import annotations

import builtins
import ctypes
import faulthandler
import gc
import importlib
import os
import queue
import resource
import signal
import socket
import sys
import threading
import time
import traceback
import types
from typing import Any

import cloudpickle

import tfsd_worker
from tfsd_worker import _state
from tfsd_worker._errors import (
    FAILED_PRECONDITION,
    INTERNAL,
    INVALID_ARGUMENT,
    UNIMPLEMENTED,
    WorkerError,
)
from tfsd_worker._streams import STDERR, STDOUT, CallStream
from tfsd_worker._wire import Connection, FrameTooLarge, pb

DEFAULT_PRELOAD = "tensorflow,keras"

# Requests of graph sessions: answered UNIMPLEMENTED.
GRAPH_REQUESTS = (
    "load",
    "extend",
    "run",
    "partial_run_setup",
    "partial_run",
    "export_variables",
    "import_variables",
)
# Requests the main thread runs, in order.
SESSION_REQUESTS = ("call", "reset_graph", "purge_variables", "export_state", "import_state")

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_INT32 = range(-(2**31), 2**31)


def log(message: str) -> None:
    """A line in the daemon's log (the worker's stderr, fd 2: sys.stderr may be a call's)."""
    try:
        os.write(2, f"tfsd python worker {os.getpid()}: {message}\n".encode("utf-8", "replace"))
    except OSError:
        pass


def exit_now(status: int) -> None:
    """Ends the process at once, whatever the main thread runs."""
    os._exit(status)


# ---------------------------------------------------------------------------------------------
# Preload.


def preload_modules() -> list[str]:
    names = os.environ.get("TFSD_PYTHON_PRELOAD")
    if names is None:
        names = DEFAULT_PRELOAD
    return [name.strip() for name in names.split(",") if name.strip()]


def module_version(name: str, module: Any) -> str | None:
    version = getattr(module, "__version__", None)
    if isinstance(version, str):
        return version
    try:
        from importlib import metadata

        return metadata.version(name)
    except Exception:  # noqa: BLE001 - a version is a courtesy
        return None


#: (stage, seconds) of the start, logged with TFSD_PYTHON_WORKER_TIMING=1.
startup_timings: list[tuple[str, float]] = []


def preload() -> tuple[str, str]:
    """Imports TFSD_PYTHON_PRELOAD; answers (TensorFlow's version if that loaded TensorFlow,
    else "", and the runtime line).

    A module that fails to import ends the process with status 1 before Ready.
    """
    described = ["python " + ".".join(str(part) for part in sys.version_info[:3])]
    tensorflow_version = ""
    for name in preload_modules():
        started = time.monotonic()
        try:
            module = importlib.import_module(name)
        except BaseException as error:  # noqa: BLE001 - SystemExit from a module counts too
            log(f"preloading {name!r} (TFSD_PYTHON_PRELOAD) failed:")
            traceback.print_exception(error, file=sys.__stderr__)
            sys.__stderr__.flush()
            exit_now(1)
        startup_timings.append((f"import {name}", time.monotonic() - started))
        version = module_version(name, module)
        described.append(f"{name} {version}" if version else name)
    # Loaded by the preload, directly or not (keras imports it).
    if "tensorflow" in sys.modules:
        tensorflow_version = getattr(sys.modules["tensorflow"], "__version__", "") or ""
    if "tensorflow" in sys.modules and os.environ.get("TFSD_PYTHON_WARMUP", "1") != "0":
        started = time.monotonic()
        warm_up(sys.modules["tensorflow"])
        startup_timings.append(("warm-up", time.monotonic() - started))
    return tensorflow_version, ", ".join(described)


def warm_up(tf) -> None:
    """One tiny eager op: TensorFlow's one-time initialisation (devices, the eager context,
    kernel registration) is paid before Ready, not by the session's first call."""
    try:
        tf.reduce_sum(tf.ones((2, 2))).numpy()
    except Exception as error:  # noqa: BLE001 - the user's first call will say what is wrong
        log(f"TensorFlow warm-up failed: {type(error).__name__}: {error}")


# ---------------------------------------------------------------------------------------------
# Exceptions of the user's code.


def _is_ours(filename: str) -> bool:
    return os.path.dirname(os.path.abspath(filename)) == _PACKAGE_DIR


def _without_our_frames(exception: traceback.TracebackException, seen: set[int]) -> None:
    """Drops the worker's own frames (calling the user's code, sending its output) from a
    formatted exception and the exceptions chained to it."""
    if id(exception) in seen:
        return
    seen.add(id(exception))
    exception.stack = traceback.StackSummary.from_list(
        [frame for frame in exception.stack if not _is_ours(frame.filename)]
    )
    for chained in (exception.__cause__, exception.__context__):
        if chained is not None:
            _without_our_frames(chained, seen)
    for group_member in getattr(exception, "exceptions", None) or ():
        _without_our_frames(group_member, seen)


_OUTPUT_FILES = {
    os.path.join(_PACKAGE_DIR, "_streams.py"),
    os.path.join(_PACKAGE_DIR, "_wire.py"),
}
_OUTPUT_FUNCTIONS = {"send", "send_output"}


def in_output_path(frame) -> bool:
    """Whether `frame` (the main thread's, in a signal handler) is inside the worker's code
    that sends a call's output."""
    while frame is not None:
        filename = os.path.abspath(frame.f_code.co_filename)
        if filename in _OUTPUT_FILES:
            return True
        if os.path.dirname(filename) == _PACKAGE_DIR and frame.f_code.co_name in _OUTPUT_FUNCTIONS:
            return True
        frame = frame.f_back
    return False


def remote_exception(
    error: BaseException, context: str = "", with_traceback: bool = True
) -> pb.CallReturn:
    kind = type(error)
    module = getattr(kind, "__module__", None) or "builtins"
    message = str(error)
    if context:
        message = f"{context}: {message}" if message else context
    if with_traceback:
        formatted = traceback.TracebackException.from_exception(error)
        _without_our_frames(formatted, set())
        lines = formatted.format()
    else:
        lines = traceback.format_exception_only(error)
    return pb.CallReturn(
        exception=pb.RemoteException(
            type_name=f"{module}.{kind.__qualname__}",
            message=message,
            traceback="".join(lines),
        )
    )


def exit_code(stop: SystemExit, stderr) -> int:
    """A script's SystemExit as a process exit status, the way CPython makes one."""
    code = stop.code
    if code is None:
        return 0
    if isinstance(code, int):
        return code if code in _INT32 else code & 0xFF
    try:
        print(code, file=stderr)
    except Exception:  # noqa: BLE001
        pass
    return 1


# ---------------------------------------------------------------------------------------------
# The worker.


class Worker:
    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        self.requests: queue.SimpleQueue[pb.WorkerRequest] = queue.SimpleQueue()
        self.ready = threading.Event()
        self.main_thread = threading.main_thread().ident
        # Guards which call runs, and which queued calls were cancelled before they started.
        self.lock = threading.Lock()
        self.running: int | None = None
        self.queued_calls: set[int] = set()
        self.cancelled: set[int] = set()
        self.interrupt_requested = False
        # Set and read only on the main thread (the SIGINT handler runs there too): whether
        # the user's code runs, and whether an interrupt waits for a write to end.
        self.interruptible = False
        self.interrupt_deferred = False
        self.stdout = sys.stdout
        self.stderr = sys.stderr

    # -- the wire ------------------------------------------------------------------------

    def send(self, response: pb.WorkerResponse) -> None:
        try:
            self.connection.send(response)
        except FrameTooLarge as error:
            self.send(
                pb.WorkerResponse(
                    id=response.id, error=pb.Error(code=FAILED_PRECONDITION, message=str(error))
                )
            )
        except OSError as error:
            # The supervisor is gone (or closed its end): nobody is left to answer.
            log(f"cannot write to the supervisor ({error}); exiting")
            exit_now(0)

    def send_error(self, request_id: int, code: int, message: str) -> None:
        self.send(pb.WorkerResponse(id=request_id, error=pb.Error(code=code, message=message)))

    # -- the reader thread -----------------------------------------------------------------

    def read_requests(self) -> None:
        try:
            self._read_requests()
        except BaseException as error:  # noqa: BLE001 - the reader must not die silently
            log(f"reading requests failed: {type(error).__name__}: {error}; exiting")
            exit_now(1)

    def _read_requests(self) -> None:
        while True:
            try:
                frame = self.connection.read_frame()
            except FrameTooLarge as error:
                # The stream cannot be followed past a frame we do not read.
                log(f"{error}; exiting")
                exit_now(1)
            except OSError as error:
                log(f"reading from the supervisor failed ({error}); exiting")
                exit_now(1)
            if frame is None:
                # The supervisor is done with this worker, or gone.
                exit_now(0)
            try:
                request = pb.WorkerRequest.FromString(frame)
            except Exception as error:  # noqa: BLE001 - DecodeError, or anything upb raises
                # No id to answer with: logged and skipped; the next frame is read as usual.
                log(f"ignored a frame of {len(frame)} bytes that is not a WorkerRequest: {error}")
                continue
            finally:
                del frame
            self.ready.wait()
            self.dispatch(request)

    def dispatch(self, request: pb.WorkerRequest) -> None:
        kind = request.WhichOneof("kind")
        if kind in SESSION_REQUESTS:
            if kind == "call":
                with self.lock:
                    self.queued_calls.add(request.id)
            self.requests.put(request)
        elif kind == "cancel":
            self.cancel(request.cancel.call_id)
            self.send(pb.WorkerResponse(id=request.id, done=pb.Done()))
        elif kind == "set_data_limit":
            # The session's hard limit as RLIMIT_DATA (soft and hard: the session's code
            # cannot raise it again), where the supervisor may not set it for this process.
            limit = request.set_data_limit.bytes
            if limit >= 2**63 - 1:
                # The supervisor's "unlimited" (u64::MAX) does not fit Python's rlim_t.
                limit = resource.RLIM_INFINITY
            try:
                resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
            except (OSError, ValueError, OverflowError) as error:
                self.send_error(request.id, INTERNAL, f"setrlimit(RLIMIT_DATA, {limit}): {error}")
            else:
                self.send(pb.WorkerResponse(id=request.id, done=pb.Done()))
        elif kind in GRAPH_REQUESTS:
            self.send_error(
                request.id,
                UNIMPLEMENTED,
                f"a Python session runs no TensorFlow graph: {kind} applies to graph sessions",
            )
        else:
            self.send_error(
                request.id,
                INVALID_ARGUMENT,
                f"request {request.id} has no kind the Python worker knows "
                "(empty, or from a newer tfsd)",
            )

    def cancel(self, call_id: int) -> None:
        with self.lock:
            if self.running == call_id:
                self.interrupt_requested = True
                self._interrupt_main()
            elif call_id in self.queued_calls:
                self.cancelled.add(call_id)

    def _interrupt_main(self) -> None:
        """SIGINT to the main thread (with self.lock held): its handler runs at the next
        bytecode, and a blocking call there (sleep, a wait) returns EINTR and runs it now."""
        signal.pthread_kill(self.main_thread, signal.SIGINT)

    def _interrupt_again(self, call_id: int) -> None:
        with self.lock:
            if self.running == call_id and self.interrupt_requested:
                self._interrupt_main()

    # -- the main thread -------------------------------------------------------------------

    def on_sigint(self, signum, frame) -> None:
        # Runs on the main thread, between bytecodes. Only a cancel interrupts, and only while
        # the user's code runs: a late signal finds `interruptible` cleared and is dropped.
        if not (self.interruptible and self.interrupt_requested):
            return
        if in_output_path(frame):
            # The call is writing output: an exception raised here could cut a frame short or
            # make the stream's buffer send its data twice. Raised when the write is done
            # (after_write); tried again shortly in case no write ends (bytes written to
            # sys.stdout.buffer).
            self.interrupt_deferred = True
            timer = threading.Timer(0.01, self._interrupt_again, (self.running,))
            timer.daemon = True
            timer.start()
            return
        self.interrupt_requested = False
        self.interrupt_deferred = False
        raise KeyboardInterrupt

    def after_write(self) -> None:
        """Raises an interrupt deferred while the call wrote to sys.stdout or sys.stderr."""
        if (
            self.interrupt_deferred
            and self.interruptible
            and self.interrupt_requested
            and threading.get_ident() == self.main_thread
        ):
            self.interrupt_requested = False
            self.interrupt_deferred = False
            raise KeyboardInterrupt

    def serve(self) -> None:
        while True:
            request = self.requests.get()
            kind = request.WhichOneof("kind")
            try:
                if kind == "call":
                    response = pb.WorkerResponse(id=request.id, call_return=self.call(request))
                elif kind == "reset_graph":
                    reset_graph()
                    response = pb.WorkerResponse(id=request.id, done=pb.Done())
                elif kind == "purge_variables":
                    tfsd_worker.state.__dict__.clear()
                    reset_graph()
                    response = pb.WorkerResponse(id=request.id, done=pb.Done())
                elif kind == "export_state":
                    data, objects = _state.export_state(tfsd_worker.state)
                    response = pb.WorkerResponse(
                        id=request.id, state=pb.State(state=data, objects=objects)
                    )
                elif kind == "import_state":
                    _state.import_state(request.import_state.state, tfsd_worker.state)
                    response = pb.WorkerResponse(id=request.id, done=pb.Done())
                else:  # not queued by dispatch
                    raise WorkerError(INTERNAL, f"{kind} reached the main thread")
            except WorkerError as error:
                response = pb.WorkerResponse(
                    id=request.id, error=pb.Error(code=error.code, message=error.message)
                )
            except BaseException as error:  # noqa: BLE001 - a failure of tfsd, not of user code
                log(f"{kind} (request {request.id}) failed:\n" + "".join(
                    traceback.format_exception(error)
                ))
                response = pb.WorkerResponse(
                    id=request.id,
                    error=pb.Error(
                        code=INTERNAL,
                        message=f"the Python worker failed to {kind}: "
                        f"{type(error).__name__}: {error}",
                    ),
                )
            self.send(response)
            # Drop what the request's answer referenced before waiting for the next one.
            del request, response

    def call(self, request: pb.WorkerRequest) -> pb.CallReturn:
        call_id = request.id
        with self.lock:
            self.queued_calls.discard(call_id)
            if call_id in self.cancelled:
                self.cancelled.discard(call_id)
                return remote_exception(
                    KeyboardInterrupt("cancelled before it started"), with_traceback=False
                )
            self.running = call_id
            self.interrupt_requested = False
            self.interrupt_deferred = False
        try:
            return self._call(call_id, request.call)
        finally:
            with self.lock:
                self.running = None
                self.interrupt_requested = False

    def _call(self, call_id: int, call: pb.Call) -> pb.CallReturn:
        target = call.WhichOneof("target")
        if target is None:
            raise WorkerError(INVALID_ARGUMENT, "the call names neither a function nor a script")

        def send_output(stream: int, data: bytes) -> None:
            self.send(
                pb.WorkerResponse(id=call_id, output=pb.CallOutput(stream=stream, data=data))
            )

        stdout = CallStream(send_output, STDOUT, self.stdout, self.after_write)
        stderr = CallStream(send_output, STDERR, self.stderr, self.after_write)
        sys.stdout, sys.stderr = stdout, stderr
        # The user's code may have replaced the handler in an earlier call.
        signal.signal(signal.SIGINT, self.on_sigint)
        try:
            if target == "pickled":
                return self._call_pickled(call.pickled)
            return self._run_script(call.script, stderr)
        finally:
            # Everything the call wrote leaves before its answer.
            stdout.end()
            stderr.end()
            sys.stdout, sys.stderr = self.stdout, self.stderr

    def _call_pickled(self, pickled: bytes) -> pb.CallReturn:
        try:
            self.interruptible = True
            try:
                try:
                    loaded = cloudpickle.loads(pickled)
                except BaseException as error:  # noqa: BLE001 - the user's objects' doing
                    return remote_exception(error, "unpickling the call's function and arguments")
                if not (isinstance(loaded, tuple) and len(loaded) == 3):
                    raise WorkerError(
                        INVALID_ARGUMENT,
                        "a pickled call is cloudpickle.dumps((function, args, kwargs)), "
                        f"not a {_state.describe(loaded)}",
                    )
                function, args, kwargs = loaded
                del loaded
                try:
                    args, kwargs = tuple(args), dict(kwargs)
                except (TypeError, ValueError) as error:
                    raise WorkerError(
                        INVALID_ARGUMENT,
                        f"a pickled call's arguments are a sequence and a mapping: {error}",
                    ) from None
                if not callable(function):
                    raise WorkerError(
                        INVALID_ARGUMENT,
                        f"the call's function is a {_state.describe(function)}, not a callable",
                    )
                result = function(*args, **kwargs)
                del function, args, kwargs
                try:
                    pickled_result = cloudpickle.dumps(result)
                except BaseException as error:  # noqa: BLE001 - the user's objects' doing
                    if isinstance(error, KeyboardInterrupt):
                        raise
                    return remote_exception(
                        error,
                        "the call's result could not be sent back: "
                        + _state.pickle_error(result, error, "result"),
                        with_traceback=False,
                    )
                return pb.CallReturn(pickled=pickled_result)
            finally:
                self.interruptible = False
        except WorkerError:
            raise
        except BaseException as error:  # noqa: BLE001 - the user's code raised
            return remote_exception(error)

    def _run_script(self, script: pb.Script, stderr) -> pb.CallReturn:
        path = script.path or "<script>"
        try:
            code = compile(script.source, path, "exec", dont_inherit=True)
        except (SyntaxError, ValueError) as error:
            return remote_exception(error, with_traceback=False)
        module = types.ModuleType("__main__")
        module.__file__ = path
        module.__builtins__ = builtins
        module.__loader__ = None
        module.__spec__ = None
        saved_main = sys.modules.get("__main__")
        saved_argv = sys.argv
        sys.modules["__main__"] = module
        sys.argv = [path, *script.argv]
        try:
            try:
                self.interruptible = True
                try:
                    exec(code, module.__dict__)
                finally:
                    self.interruptible = False
            except SystemExit as stop:
                return pb.CallReturn(exit_code=exit_code(stop, stderr))
            except BaseException as error:  # noqa: BLE001 - the user's code raised
                return remote_exception(error)
            return pb.CallReturn(exit_code=0)
        finally:
            sys.argv = saved_argv
            if saved_main is not None:
                sys.modules["__main__"] = saved_main
            else:
                sys.modules.pop("__main__", None)


# ---------------------------------------------------------------------------------------------
# Resets.


def reset_graph() -> None:
    """Keras' and TensorFlow's global state cleared (only if the session imported them), then
    garbage collected and free heap memory handed back to the system."""
    keras = sys.modules.get("keras")
    if keras is not None:
        try:
            # Its own gc.collect() would be a second one (half a second with Keras loaded).
            keras.backend.clear_session(free_memory=False)
        except TypeError:  # a Keras without free_memory
            keras.backend.clear_session()
    tf = sys.modules.get("tensorflow")
    if tf is not None:
        tf.compat.v1.reset_default_graph()
    gc.collect()
    malloc_trim()


_libc = None


def malloc_trim() -> None:
    global _libc
    try:
        if _libc is None:
            _libc = ctypes.CDLL("libc.so.6")
        _libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc


# ---------------------------------------------------------------------------------------------
# Start.


def main() -> None:
    started = time.monotonic()
    faulthandler.enable(file=sys.__stderr__ or sys.stderr)
    try:
        fd = int(os.environ["TFSD_WORKER_FD"])
    except (KeyError, ValueError):
        sys.exit(
            "tfsd_worker: TFSD_WORKER_FD is not set to a descriptor number: "
            "the Python worker is started by the tfsd daemon"
        )
    supervisor = os.environ.get("TFSD_SUPERVISOR_PID")
    if supervisor is not None and supervisor != str(os.getppid()):
        # The supervisor may have died before PR_SET_PDEATHSIG took effect.
        sys.exit(f"tfsd_worker: the tfsd supervisor (pid {supervisor}) is gone")
    try:
        sock = socket.socket(fileno=fd)
    except OSError as error:
        sys.exit(f"tfsd_worker: descriptor {fd} is not the supervisor's socket: {error}")
    # Not inherited by processes the user's code starts.
    sock.set_inheritable(False)

    worker = Worker(Connection(sock))
    # The reader starts first: a supervisor that hangs up during the (slow) preload ends the
    # process at once. It holds requests until Ready is sent.
    threading.Thread(target=worker.read_requests, name="tfsd-reader", daemon=True).start()

    tensorflow_version, runtime = preload()
    signal.signal(signal.SIGINT, worker.on_sigint)
    worker.send(
        pb.WorkerResponse(
            id=0,
            ready=pb.Ready(
                pid=os.getpid(), tensorflow_version=tensorflow_version, runtime=runtime
            ),
        )
    )
    worker.ready.set()
    if os.environ.get("TFSD_PYTHON_WORKER_TIMING"):
        stages = ", ".join(f"{stage} {seconds:.3f} s" for stage, seconds in startup_timings)
        log(f"ready {time.monotonic() - started:.3f} s after start ({stages}; {runtime})")
    worker.serve()
