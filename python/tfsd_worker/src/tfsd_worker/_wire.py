"""Frames on the supervisor's socket: a 4-byte big-endian length, then one protobuf message."""

from __future__ import annotations

import socket
import struct
import threading

from tfsd_worker._gen.tfsd.worker.v1 import worker_pb2 as pb

__all__ = ["Connection", "MAX_FRAME_BYTES", "pb"]

#: Largest frame either side accepts (the supervisor and tfsd-worker use the same limit).
MAX_FRAME_BYTES = 2 << 30

_LENGTH = struct.Struct(">I")


class FrameTooLarge(Exception):
    pass


class Connection:
    """The worker's end of the socketpair. Reads from one thread; writes from any."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._write_lock = threading.Lock()

    def read_frame(self) -> bytearray | None:
        """The next frame's payload; None at end of stream (the supervisor closed its end)."""
        header = self._read_exactly(_LENGTH.size)
        if header is None:
            return None
        (length,) = _LENGTH.unpack(header)
        if length > MAX_FRAME_BYTES:
            raise FrameTooLarge(
                f"the supervisor sent a frame of {length} bytes (most: {MAX_FRAME_BYTES})"
            )
        if length == 0:
            return bytearray()
        payload = self._read_exactly(length)
        if payload is None:
            return None
        return payload

    def _read_exactly(self, n: int) -> bytearray | None:
        buffer = bytearray(n)
        view = memoryview(buffer)
        got = 0
        while got < n:
            try:
                read = self.sock.recv_into(view[got:], n - got)
            except InterruptedError:
                continue
            if read == 0:
                return None
            got += read
        # Not copied into bytes: a frame may be a large exported state.
        return buffer

    def send(self, response: pb.WorkerResponse) -> None:
        """Sends one response as one frame; frames from several threads never interleave."""
        payload = response.SerializeToString()
        if len(payload) > MAX_FRAME_BYTES:
            raise FrameTooLarge(
                f"the answer is {len(payload)} bytes, more than the supervisor and its worker "
                f"exchange in one message ({MAX_FRAME_BYTES} bytes)"
            )
        header = _LENGTH.pack(len(payload))
        with self._write_lock:
            if len(payload) < 65536:
                self.sock.sendall(header + payload)
            else:
                self.sock.sendall(header)
                self.sock.sendall(payload)
