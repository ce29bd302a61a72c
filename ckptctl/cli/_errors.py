"""One table from exception to message and exit code, used by ``main``.

Core errors (``CkptctlError``) already carry a code and message. A few foreign exceptions that reach the CLI
from user input are mapped here to the same shape. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from ckptctl.errors import (
    CkptctlError,
    IntegrityError,
    NotFoundError,
    PermissionDeniedError,
    StorageUnavailableError,
)

# Subclasses before their bases: the first match wins.
FOREIGN_ERROR_MAPPINGS: list[tuple[type[BaseException], type[CkptctlError]]] = [
    (FileNotFoundError, NotFoundError),
    (PermissionError, PermissionDeniedError),
    (IsADirectoryError, NotFoundError),
    (NotADirectoryError, NotFoundError),
    (ConnectionError, StorageUnavailableError),
    (TimeoutError, StorageUnavailableError),
    (UnicodeDecodeError, IntegrityError),
]


def as_ckptctl_error(exc: BaseException) -> CkptctlError | None:
    """The ckptctl error for ``exc``, or None when it is a bug that should keep its traceback."""
    if isinstance(exc, CkptctlError):
        return exc
    for foreign, ours in FOREIGN_ERROR_MAPPINGS:
        if isinstance(exc, foreign):
            text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            return ours(text)
    return None
