"""Errors of tfsd itself (not of the user's code), answered as `Error{code, message}`."""

from __future__ import annotations

# TensorFlow's status codes (the same numbers as gRPC's).
CANCELLED = 1
UNKNOWN = 2
INVALID_ARGUMENT = 3
FAILED_PRECONDITION = 9
UNIMPLEMENTED = 12
INTERNAL = 13


class WorkerError(Exception):
    """Answered as an `error` frame with this code and message."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
