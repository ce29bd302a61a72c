"""Keep rules written down beside the runs: ``.ckptctl.toml`` files, merged with the flags into one set of
settings, each remembering where it came from.

A file in a run folder, or in any folder above it (up to ROOT for ``prune ROOT --each-run``, up to the top of
the store for ``prune RUN``), holds the rules under the flags' names (``keep-last = 3``); ``[runs."GLOB"]``
tables scope rules to the runs whose path (relative to the file's folder) matches GLOB. The nearest file wins
key by key, a matching scope over its file's top level, a flag over every file. A file that does not parse, an
unknown key or a wrong type is a ``PolicyFileError`` naming the file and line (exit 2): never "no rules".

Cost: one existence check per folder between the run and the top (memoised across runs), one capped read per
file found.
"""

from __future__ import annotations

import fnmatch
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ckptctl.catalog.model import POLICY_FILE
from ckptctl.errors import CkptctlError, PermissionDeniedError, UsageError, literal
from ckptctl.humanize import parse_duration, parse_size, parse_steps
from ckptctl.retention.policy import Policy
from ckptctl.storage.location import Location, is_url

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

POLICY_FILE_LIMIT = 64 * 1024
MAX_LEVELS = 32


class PolicyFileError(UsageError):
    """A ``.ckptctl.toml`` that cannot be used as written (syntax, an unknown key, a wrong type)."""

    code = "policy_file"


def _count(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError("a whole number")
    return value


def _text(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise TypeError("a non-empty string")
    return value


def _seconds(value: Any) -> float:
    if isinstance(value, bool):
        raise TypeError('a duration such as "10m" or a number of seconds')
    if isinstance(value, (int, float)):
        if value < 0:
            raise TypeError("a duration that is not negative")
        return float(value)
    if isinstance(value, str):
        return parse_duration(value)
    raise TypeError('a duration such as "10m" or a number of seconds')


def _bytes(value: Any) -> int:
    if isinstance(value, bool):
        raise TypeError('a size such as "2TB" or a number of bytes')
    if isinstance(value, int) and value >= 0:
        return value
    if isinstance(value, str):
        return parse_size(value)
    raise TypeError('a size such as "2TB" or a number of bytes')


def _step_list(value: Any) -> tuple[int, ...]:
    if isinstance(value, str):
        return tuple(parse_steps(value))
    if isinstance(value, list) and all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value
    ):
        return tuple(value)
    raise TypeError("a list of step numbers, e.g. [1000, 2000]")


# Every key a policy file may hold: the flag's name without "--", and how its value is checked.
KEYS: dict[str, Callable[[Any], Any]] = {
    "keep-last": _count,
    "keep-total": _count,
    "keep-best": _count,
    "metric": _text,
    "metric-file": _text,
    "step-key": _text,
    "keep-every-steps": _count,
    "keep-within": _seconds,
    "keep-steps": _step_list,
    "max-delete": _count,
    "max-delete-bytes": _bytes,
    "settle": _seconds,
}
KEEP_RULES = ("keep-last", "keep-total", "keep-best", "keep-every-steps", "keep-within", "keep-steps")


@dataclass(frozen=True)
class Setting:
    """One rule's value and where it came from: ``--keep-last`` or ``s3://b/root/.ckptctl.toml:3``."""

    value: Any
    source: str

    @property
    def from_file(self) -> bool:
        return not self.source.startswith("--")


@dataclass(frozen=True)
class PolicyFile:
    """One parsed ``.ckptctl.toml``: its top-level rules and its ``[runs."GLOB"]`` scopes, in file order."""

    url: str
    rules: Mapping[str, Setting]
    scopes: tuple[tuple[str, Mapping[str, Setting]], ...] = ()

    def rules_for(self, run: str) -> dict[str, Setting]:
        """The rules this file gives ``run`` (its path relative to the file's folder; ``""`` for the folder)."""
        found = dict(self.rules)
        for pattern, rules in self.scopes:
            if fnmatch.fnmatchcase(run, pattern):
                found.update(rules)
        return found


def _key_lines(text: str) -> dict[tuple[str, str], int]:
    """(table, key) -> line number, for messages: tomllib reports where syntax fails, not where a key is."""
    lines: dict[tuple[str, str], int] = {}
    table = ""
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        header = re.fullmatch(r"\[\s*(.+?)\s*\]\s*(#.*)?", stripped)
        if header and not stripped.startswith("[["):
            table = header.group(1)
            lines.setdefault((table, ""), number)
            continue
        key = re.match(r"""\s*(?:"([^"]+)"|'([^']+)'|([A-Za-z0-9_-]+))\s*=""", line)
        if key:
            lines.setdefault((table, next(g for g in key.groups() if g)), number)
    return lines


def _scope_table(name: str) -> str:
    return f'runs."{name}"'


def parse_policy_file(data: bytes, url: str) -> PolicyFile:
    """Validate a policy file as a whole; the first problem is a PolicyFileError naming ``url:line``."""
    try:
        text = data.decode("utf-8")
        document = tomllib.loads(text)
    except UnicodeDecodeError:
        raise PolicyFileError(f"{url}: not UTF-8 text", url=url) from None
    except tomllib.TOMLDecodeError as exc:
        found = re.search(r"line (\d+)", str(exc))
        # "at end of document": the last line that holds anything.
        last = len(text.rstrip().splitlines()) or 1
        where = f"{url}:{found.group(1) if found else last}"
        reason = str(exc).split(" (at ")[0]
        raise PolicyFileError(f"{where}: not valid TOML ({reason})", url=url) from None
    lines = _key_lines(text)

    def checked(table: str, values: Mapping[str, Any], shown: str) -> dict[str, Setting]:
        rules: dict[str, Setting] = {}
        for key, value in values.items():
            line = lines.get((table, key)) or lines.get((table, ""))
            where = f"{url}:{line}" if line else url
            check = KEYS.get(key)
            if check is None:
                known = ", ".join(KEYS)
                raise PolicyFileError(
                    f'{where}: unknown key {key!r}{shown} (a policy file holds: {known}, and [runs."GLOB"] '
                    "tables)",
                    url=url,
                )
            try:
                rules[key] = Setting(check(value), where)
            except TypeError as exc:
                raise PolicyFileError(f"{where}: {key} must be {exc}, not {value!r}", url=url) from None
            except CkptctlError as exc:
                raise PolicyFileError(f"{where}: {key}: {exc.message}", url=url) from None
        return rules

    scoped = document.pop("runs", {})
    rules = checked("", document, "")
    if not isinstance(scoped, dict) or not all(isinstance(v, dict) for v in scoped.values()):
        line = lines.get(("", "runs")) or lines.get(("runs", ""))
        raise PolicyFileError(
            f"{url}:{line or 1}: 'runs' holds tables, one per glob: [runs.\"llama-*\"] keep-last = 5", url=url
        )
    scopes = tuple(
        (pattern, checked(_scope_table(pattern), values, f" in [runs.{pattern!r}]"))
        for pattern, values in scoped.items()
    )
    return PolicyFile(url, rules, scopes)


@dataclass
class PolicyFinder:
    """Reads the policy files of many runs, each folder's file at most once (``prune ROOT --each-run``).

    ``listed`` (a root, and the policy files its listing holds) answers "is there a file?" for every folder at or
    below that root without a request: a survey of a thousand runs reads only the files that exist."""

    listed: tuple[Location, frozenset[str]] | None = None
    _seen: dict[str, PolicyFile | None] = field(default_factory=dict)

    def _listed_presence(self, folder: Location) -> bool | None:
        if self.listed is None:
            return None
        root, files = self.listed
        if folder.fs is not root.fs:
            return None
        if folder.root == root.root:
            return POLICY_FILE in files
        if folder.root.startswith(root.root.rstrip("/") + "/"):
            return f"{folder.root[len(root.root.rstrip('/')) + 1 :]}/{POLICY_FILE}" in files
        return None

    def file_in(self, folder: Location, *, above_run: bool = False) -> PolicyFile | None:
        """The folder's policy file, if it has one. A folder above the run that we may not look into holds no
        rules for us; a file we can see but not read is an error, as is anything that is not a regular file."""
        key = folder.url_of(POLICY_FILE)
        if key not in self._seen:
            self._seen[key] = None
            present = self._listed_presence(folder)
            try:
                if present is None:
                    present = folder.exists(POLICY_FILE)
            except PermissionDeniedError:
                if not above_run:
                    raise
                present = False
            if present:
                data = folder.read_bytes(POLICY_FILE, max_bytes=POLICY_FILE_LIMIT)
                self._seen[key] = parse_policy_file(data, key)
        return self._seen[key]

    def chain(self, run: Location, root: Location | None = None) -> list[tuple[PolicyFile, str]]:
        """The files that apply to ``run``, nearest first, each with the run's path relative to its folder:
        from the run up to ``root`` (inclusive), or up to the top of the store when ``root`` is None."""
        found: list[tuple[PolicyFile, str]] = []
        here, below = run, ""
        for _ in range(MAX_LEVELS):
            policy = self.file_in(here, above_run=here is not run)
            if policy is not None:
                found.append((policy, below))
            if (root is not None and here.root == root.root) or here.at_top:
                break
            below = f"{here.name}/{below}".rstrip("/") if below else here.name
            here = here.parent()
        return found


def merge_settings(
    chain: Sequence[tuple[PolicyFile, str]], flags: Mapping[str, Setting]
) -> dict[str, Setting]:
    """Nearest file wins key by key, flags over every file."""
    merged: dict[str, Setting] = {}
    for policy, run in reversed(chain):
        merged.update(policy.rules_for(run))
    merged.update(flags)
    return merged


@dataclass(frozen=True)
class RunRules:
    """The settings one run is pruned by, with their sources, and what they build."""

    settings: Mapping[str, Setting]
    pinned_steps: tuple[int, ...] = ()
    keep_without_metric: bool = True

    @property
    def has_keep_rule(self) -> bool:
        return any(key in self.settings for key in KEEP_RULES)

    def value(self, key: str, default: Any = None) -> Any:
        setting = self.settings.get(key)
        return default if setting is None else setting.value

    def names(self, flags: Mapping[str, str]) -> dict[str, str]:
        """How messages name each setting: the flag when a flag set it (or for one no file set), else the
        key and the file line it came from (``keep-last (/data/.ckptctl.toml:3)``)."""
        names = dict(flags)
        for key, setting in self.settings.items():
            if setting.from_file:
                names[key.replace("-", "_")] = literal(f"{key} ({setting.source})")
        return names

    def policy(self) -> Policy:
        """Policy.build on the merged settings (PolicyError words them by setting; see ``names``)."""
        return Policy.build(
            keep_last=self.value("keep-last"),
            keep_total=self.value("keep-total"),
            keep_best=self.value("keep-best"),
            metric=self.value("metric"),
            keep_every_steps=self.value("keep-every-steps"),
            keep_within_seconds=self.value("keep-within"),
            keep_steps=self.value("keep-steps", ()),
            pinned_steps=self.pinned_steps,
            keep_without_metric=self.keep_without_metric,
        )

    def metric_file(self, run: Location, options: Mapping[str, Any]) -> Location | None:
        """A flag's path is as typed (relative to where ckptctl runs); a file's is relative to the run."""
        setting = self.settings.get("metric-file")
        if setting is None:
            return None
        path = str(setting.value)
        if not setting.from_file or is_url(path) or path.startswith("/"):
            return Location.from_url(path, dict(options))
        return run.child(path)

    def describe(self) -> list[dict[str, Any]]:
        """For ``--json`` and the plan's header: each setting with its value and source."""
        return [
            {
                "setting": key,
                "value": list(s.value) if isinstance(s.value, tuple) else s.value,
                "from": s.source,
            }
            for key, s in sorted(self.settings.items())
        ]
