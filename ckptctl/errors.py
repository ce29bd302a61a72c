"""The exceptions ckptctl's core raises, each with a stable ``code`` and a documented exit code.

The command-line layer maps these to one line on stderr (``cli/_errors.py``); library users catch
``CkptctlError`` and read ``code`` instead of parsing messages.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import IntEnum
from typing import TypeVar


class ExitCode(IntEnum):
    """Exit codes shared by every command (documented in the README)."""

    OK = 0
    INTERNAL = 1
    USAGE = 2
    NOT_FOUND = 3
    REFUSED = 4
    PARTIAL = 5
    LOCKED = 6
    METRIC = 7
    INTEGRITY = 8


_E = TypeVar("_E", bound="CkptctlError")


class _SettingNames(dict[str, str]):
    """``{keep_last}`` in a message template: the flag a command maps it to, else the setting's own name
    (``keep-last``, as a policy file spells it)."""

    def __missing__(self, key: str) -> str:
        return key.replace("_", "-")


def literal(text: object) -> str:
    """User text (a path, a metric name) inside a ``CkptctlError.naming`` template: its braces doubled."""
    return str(text).replace("{", "{{").replace("}", "}}")


class CkptctlError(Exception):
    """Base of every error ckptctl raises on purpose; ``str()`` is the one-line message."""

    code: str = "error"
    exit_code: ExitCode = ExitCode.INTERNAL
    default_hint: str | None = None

    def __init__(self, message: str, *, url: str | None = None, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.url = url
        self.hint = hint if hint is not None else self.default_hint
        self.templates: tuple[str, str | None] | None = None

    @classmethod
    def naming(cls: type[_E], template: str, *, hint: str | None = None, url: str | None = None) -> _E:
        """An error about settings, named in ``template`` and ``hint`` as ``{keep_last}``: the core speaks of
        concepts, ``for_flags`` words the message with what the user typed (``--keep-local-last`` for tier
        push, a key in a policy file). User text inside a template must have its braces doubled."""
        names = _SettingNames()
        error = cls(
            template.format_map(names), url=url, hint=None if hint is None else hint.format_map(names)
        )
        error.templates = (template, hint)
        return error

    def for_flags(self: _E, flags: Mapping[str, str]) -> _E:
        """The same error naming ``flags[setting]`` for each setting (unmapped ones keep their own name). The
        worded copy is final: a second wording (``Output.error`` with the command's flags) leaves it as it is."""
        if self.templates is None:
            return self
        template, hint = self.templates
        names = _SettingNames(flags)
        return type(self)(
            template.format_map(names), url=self.url, hint=None if hint is None else hint.format_map(names)
        )


class UsageError(CkptctlError):
    code = "usage"
    exit_code = ExitCode.USAGE


class BackendNotInstalledError(CkptctlError):
    """An optional extra (s3fs, gcsfs, torch) is needed for what was asked."""

    code = "backend_not_installed"
    exit_code = ExitCode.USAGE


class NotFoundError(CkptctlError):
    code = "not_found"
    exit_code = ExitCode.NOT_FOUND


class NoSuchBucketError(NotFoundError):
    code = "no_such_bucket"


class NotADirectoryRunError(NotFoundError):
    """A file was given where a run (a folder of checkpoints) was expected."""

    code = "not_a_run"


class NothingRecognisedError(NotFoundError):
    code = "nothing_recognised"


class PermissionDeniedError(CkptctlError):
    code = "permission_denied"
    exit_code = ExitCode.NOT_FOUND
    default_hint = "check the credentials fsspec uses for this location, or the file permissions"


class NoCredentialsError(PermissionDeniedError):
    code = "no_credentials"
    default_hint = (
        "set credentials the usual way (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or a profile for s3://, "
        "GOOGLE_APPLICATION_CREDENTIALS for gs://), or -o anon=true for a public bucket"
    )


class StorageUnavailableError(CkptctlError):
    """The store could not be reached (connection refused, timed out, DNS)."""

    code = "storage_unavailable"
    exit_code = ExitCode.INTERNAL
    default_hint = "check the endpoint (--storage-option endpoint_url=...) and the network"


class NoSpaceError(CkptctlError):
    """The local disk is full (or a file-size limit was hit) while writing."""

    code = "no_space"
    exit_code = ExitCode.INTERNAL


class RefusedError(CkptctlError):
    """A safety rule refused the operation; nothing was changed."""

    code = "refused"
    exit_code = ExitCode.REFUSED


class SourceChangedError(RefusedError):
    """A file changed, shrank or vanished while it was being copied (a trainer still writing it): nothing of it
    was committed, and a re-run copies it once it is still."""

    code = "source_changed"


class LockedError(CkptctlError):
    code = "locked"
    exit_code = ExitCode.LOCKED


class MetricSourceError(CkptctlError):
    code = "metric_source"
    exit_code = ExitCode.METRIC


class IntegrityError(CkptctlError):
    """A file is corrupt or truncated."""

    code = "integrity"
    exit_code = ExitCode.INTEGRITY


class ChecksumMismatchError(IntegrityError):
    code = "checksum_mismatch"


class PartialFailureError(CkptctlError):
    """Some of the work was done and some failed; re-running resumes."""

    code = "partial"
    exit_code = ExitCode.PARTIAL


class UnsafePickleError(IntegrityError):
    """A pickle names a global that ckptctl will not load (it could run code); nothing from it was run."""

    code = "unsafe_pickle"
    default_hint = (
        "ckptctl reads only tensors, containers and known DeepSpeed/DCP records from pickles, and never runs "
        "code from a file"
    )


class NotARegularFileError(IntegrityError):
    """A file ckptctl must read (a pointer, a marker, a manifest) is a FIFO, a device or a link: never read."""

    code = "not_a_regular_file"


class InputTooLargeError(IntegrityError):
    """A small file (pointer, marker, manifest, metric file) is larger than its kind can plausibly be."""

    code = "input_too_large"


class OutputOverlapsInputError(UsageError):
    """An output is, contains or lies inside an input (OUT inside SRC, DEST inside the remote run, a push remote
    inside the run): refused before anything is written, since writing would change what is being read."""

    code = "output_overlaps_input"


class UnsafeTargetError(RefusedError):
    """A file or folder ckptctl would create or truncate (a lock, a partial folder, a download) is already there
    as a link or as something ckptctl did not make: never written through, never removed."""

    code = "unsafe_target"


class TruncatedError(IntegrityError):
    """A file ends before its own structure says it should (a header, trailer or size check proves it cut)."""

    code = "truncated"
