"""Errors a caller of the teacher service can act on.

They cross process boundaries (replica -> handle -> client, or HTTP), so every one pickles with its
constructor arguments in `args` (Ray re-raises a replica's exception as a subclass of it).
"""
from __future__ import annotations

__all__ = [
    "TeacherError",
    "TeacherRequestError",
    "TeacherOverloadedError",
    "TeacherUnavailableError",
    "TeacherTimeoutError",
    "WrongTeacherError",
    "TeacherInternalError",
]


class TeacherError(Exception):
    """Base class of every teacher-service error."""


class TeacherRequestError(TeacherError, ValueError):
    """The request itself is wrong (size limits, shapes, dtypes, ranges). Never retried.

    `field` names the offending request field, e.g. "positions" or "images[1]".
    """

    def __init__(self, field: str, reason: str):
        super().__init__(field, reason)
        self.field = field
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.field}: {self.reason}"


class TeacherOverloadedError(TeacherError):
    """The teacher's queue is full (Serve `max_queued_requests`); retried with backoff, then raised."""

    def __init__(self, message: str, attempts: int = 1):
        super().__init__(message, attempts)
        self.message = message
        self.attempts = attempts

    def __str__(self) -> str:
        return f"teacher overloaded after {self.attempts} attempt(s): {self.message}"


class TeacherUnavailableError(TeacherError):
    """No live replica answered (app missing, replica died and was not replaced in time)."""

    def __init__(self, message: str, attempts: int = 1):
        super().__init__(message, attempts)
        self.message = message
        self.attempts = attempts

    def __str__(self) -> str:
        return f"teacher unavailable after {self.attempts} attempt(s): {self.message}"


class TeacherTimeoutError(TeacherError, TimeoutError):
    """One call exceeded the client's timeout."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class WrongTeacherError(TeacherError):
    """The teacher that answered is not the one the caller expects (model id or tokenizer hash)."""

    def __init__(self, what: str, expected: str, got: str):
        super().__init__(what, expected, got)
        self.what, self.expected, self.got = what, expected, got

    def __str__(self) -> str:
        return f"wrong teacher: {self.what} is {self.got!r}, expected {self.expected!r}"


class TeacherInternalError(TeacherError):
    """The replica raised something other than a request error (a backend bug). Never retried:
    the same request would fail the same way."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return f"the teacher failed on this request: {self.message}"
