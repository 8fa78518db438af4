"""sys.stdout and sys.stderr during a call: text streams that send `output` frames."""

from __future__ import annotations

import io
import threading
from typing import Callable

STDOUT = 1
STDERR = 2

# A frame carries at most this much output; a longer write is split.
_CHUNK = 1 << 20


class _FrameSink(io.RawIOBase):
    """The raw bytes of one stream of one call, sent as `output` frames.

    Once the call has ended (`end()`), what is still written (by a thread the call started, or
    a logging handler that kept the stream) goes to `fallback` instead: the protocol allows no
    output frame after a call's last answer.
    """

    def __init__(self, send: Callable[[int, bytes], None], stream: int, fallback) -> None:
        super().__init__()
        self._send = send
        self._stream = stream
        self._fallback = fallback
        self._lock = threading.Lock()
        self._ended = False

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        data = bytes(data)
        with self._lock:
            if self._ended:
                try:
                    self._fallback.write(data)
                    self._fallback.flush()
                except (OSError, ValueError):
                    pass
                return len(data)
            for start in range(0, len(data), _CHUNK):
                self._send(self._stream, data[start : start + _CHUNK])
        return len(data)

    def end(self) -> None:
        with self._lock:
            self._ended = True


class _Buffer(io.BufferedWriter):
    """`sys.stdout.buffer` during a call: calls `after_write` once bytes are accounted for."""

    def __init__(self, raw: _FrameSink, after_write: Callable[[], None]) -> None:
        super().__init__(raw, buffer_size=8192)
        self._after_write = after_write

    def write(self, data) -> int:
        written = super().write(data)
        self._after_write()
        return written

    def flush(self) -> None:
        super().flush()
        self._after_write()


class CallStream(io.TextIOWrapper):
    """A text stream whose lines (and flushed partial lines) leave as `output` frames.

    Line buffered: a write containing a newline or a carriage return (progress bars) is sent at
    once, as is anything flushed; `.buffer` takes bytes.
    """

    def __init__(
        self,
        send: Callable[[int, bytes], None],
        stream: int,
        fallback,
        after_write: Callable[[], None] = lambda: None,
    ) -> None:
        self._sink = _FrameSink(send, stream, fallback)
        # Called after every write and flush, once the data is accounted for: where an
        # interrupt that arrived during the write is raised (see Worker.on_sigint).
        self._after_write = after_write
        super().__init__(
            _Buffer(self._sink, after_write),
            encoding="utf-8",
            errors="backslashreplace",
            line_buffering=True,
        )
        self.stream_name = "<stdout>" if stream == STDOUT else "<stderr>"
        self._fileno = 1 if stream == STDOUT else 2

    @property
    def name(self) -> str:  # type: ignore[override]
        return self.stream_name

    def write(self, text: str) -> int:
        written = super().write(text)
        self._after_write()
        return written

    def writelines(self, lines) -> None:
        super().writelines(lines)
        self._after_write()

    def flush(self) -> None:
        super().flush()
        self._after_write()

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        # Code below Python (faulthandler, a subprocess handed sys.stderr) writes to the
        # process's own descriptor: the daemon's log for stderr, /dev/null for stdout.
        return self._fileno


    def end(self) -> None:
        """Sends what is buffered; later writes go to the fallback. The stream stays open."""
        try:
            super().flush()
            io.BufferedWriter.flush(self.buffer)
        except (OSError, ValueError):
            pass
        self._sink.end()
