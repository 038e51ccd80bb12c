"""The one exception tree of overnight.

    OvernightError
     ├── NotFoundError            a record does not exist (or belongs to another tenant)
     ├── InvalidRequestError      a client request is wrong (carries ``param``)
     │    └── InputError          a line of an input file is wrong (carries ``line``)
     ├── ConflictError            the request conflicts with the record's state (HTTP 409)
     │    └── TransitionError     a batch status change that the state machine forbids
     ├── VersionConflict          a compare-and-set lost against a concurrent writer
     ├── EngineError              talking to an inference engine failed
     │    ├── RetryableEngineError   worth another attempt (429, 5xx, connection, timeout)
     │    └── FatalEngineError       not worth retrying (4xx other than 408/409/429)
     ├── RuntimeStartError        a runtime could not bring its engine up
     ├── GpusBusy                 not enough free GPUs now (wait and try again)
     ├── KubernetesError          the Kubernetes API refused or failed a request (status, reason)
     ├── StoreError               a record store is unreachable or misconfigured
     └── StorageError             a byte storage backend failed
          └── StorageFullError    no space left to write (HTTP 507)

Code outside the boundaries (HTTP clients, database drivers) is translated into
these types where it is called, so callers only ever catch overnight's own errors.
"""

from __future__ import annotations

__all__ = [
    "ConflictError",
    "EngineError",
    "FatalEngineError",
    "GpusBusy",
    "InputError",
    "InvalidRequestError",
    "KubernetesError",
    "NotFoundError",
    "OvernightError",
    "RetryableEngineError",
    "RuntimeStartError",
    "StorageError",
    "StorageFullError",
    "StoreError",
    "TransitionError",
    "VersionConflict",
]


class OvernightError(Exception):
    """Base of every error overnight raises on purpose."""

    #: OpenAI-style error ``code`` used when the error reaches an HTTP client.
    code: str | None = None

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class NotFoundError(OvernightError):
    code = "not_found"


class InvalidRequestError(OvernightError):
    code = "invalid_request"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message, code=code)
        self.param = param


class InputError(InvalidRequestError):
    """A line of an input file breaks a rule; ``line`` is 1-based (None for whole-file errors)."""

    def __init__(
        self, message: str, *, line: int | None = None, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message, param=param, code=code)
        self.line = line


class ConflictError(OvernightError):
    code = "conflict"


class TransitionError(ConflictError):
    code = "invalid_state"


class VersionConflict(OvernightError):
    """A compare-and-set update found a newer version than the one it read."""


class EngineError(OvernightError):
    """The engine could not serve a request. ``status``/``body`` are set when it answered."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        body: object = None,
        request_id: str | None = None,
        retry_after_s: float | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message, code=code)
        self.status = status
        self.body = body
        self.request_id = request_id
        self.retry_after_s = retry_after_s


class RetryableEngineError(EngineError):
    pass


class FatalEngineError(EngineError):
    pass


class RuntimeStartError(OvernightError):
    pass


class GpusBusy(OvernightError):
    """The host has enough GPUs but not enough are free now: retry once some are
    released (the batch waits its turn; it is not a failure)."""

    code = "gpus_busy"
    retryable = True

    def __init__(self, message: str, *, needed: int, free: int, total: int) -> None:
        super().__init__(message)
        self.needed = needed
        self.free = free
        self.total = total


class KubernetesError(OvernightError):
    """The Kubernetes API refused or failed a request.

    ``status`` is the HTTP status (None when no answer came: connection error,
    timeout, bad configuration), ``reason`` the API's ``Status.reason``
    (``NotFound``, ``AlreadyExists``, ``Expired``, ``Conflict``, ...), and
    ``message`` its ``Status.message``. Callers decide on ``status``/``reason``,
    never on the message text.
    """

    code = "kubernetes_error"

    #: statuses worth another attempt: throttled or a server-side fault
    RETRYABLE_STATUSES = frozenset({429, 500, 502, 503, 504})

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        reason: str | None = None,
        retry_after_s: float | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message, code=code)
        self.status = status
        self.reason = reason
        self.retry_after_s = retry_after_s

    @property
    def retryable(self) -> bool:
        """A transient failure: no answer at all (connection), 429 or a 5xx."""
        return (self.status is None and self.reason == "ConnectionError") or self.status in self.RETRYABLE_STATUSES

    @property
    def not_found(self) -> bool:
        return self.status == 404

    @property
    def already_exists(self) -> bool:
        return self.status == 409 and self.reason == "AlreadyExists"

    @property
    def gone(self) -> bool:
        """410: the requested resourceVersion is older than the server keeps."""
        return self.status == 410

    def __str__(self) -> str:
        head = f"{self.status} {self.reason}" if self.status is not None else (self.reason or "error")
        return f"Kubernetes API {head}: {self.message}"


class StoreError(OvernightError):
    pass


class StorageError(OvernightError):
    pass


class StorageFullError(StorageError):
    code = "insufficient_storage"
