"""Which tensors a conversion writes, and under which names: ``--prefix``, ``--exclude``, ``--keep-prefix``.

A prefix names a sub-tree by whole dotted components, never a substring: ``v_head`` selects ``v_head.weight``
and not ``xv_head.weight``. Pure (no I/O), applied after a format has chosen its model weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ckptctl.errors import UsageError


def _component_prefix(value: str, flag: str) -> str:
    prefix = value.strip().rstrip(".")
    if not prefix or prefix.startswith(".") or ".." in prefix:
        raise UsageError(f"{flag} takes a dotted name such as v_head or model.layers.0; got {value!r}")
    return prefix


def under(name: str, prefix: str) -> bool:
    """``name`` is ``prefix`` itself or lies in its sub-tree."""
    return name == prefix or name.startswith(prefix + ".")


@dataclass(frozen=True)
class Selection:
    prefixes: tuple[str, ...] = ()
    excludes: tuple[str, ...] = ()
    keep_prefix: bool = False

    @classmethod
    def build(
        cls, prefixes: Sequence[str] = (), excludes: Sequence[str] = (), *, keep_prefix: bool = False
    ) -> Selection:
        """Normalised flags (a trailing ``.`` is optional); UsageError for an empty or malformed one."""
        return cls(
            tuple(_component_prefix(p, "--prefix") for p in prefixes),
            tuple(_component_prefix(p, "--exclude") for p in excludes),
            keep_prefix,
        )

    @property
    def is_default(self) -> bool:
        return not self.prefixes and not self.excludes

    def rename(self, name: str) -> str | None:
        """The output name of ``name``, or None when it is not selected. With several matching prefixes the
        longest is stripped; a tensor named exactly by a prefix keeps its name."""
        if any(under(name, p) for p in self.excludes):
            return None
        if not self.prefixes:
            return name
        matching = [p for p in self.prefixes if under(name, p)]
        if not matching:
            return None
        prefix = max(matching, key=len)
        return name if self.keep_prefix or name == prefix else name[len(prefix) + 1 :]

    def apply(self, names: Sequence[str]) -> dict[str, str]:
        """Selected name -> output name, in the order given. UsageError (exit 2) when nothing is selected (it
        names the top-level prefixes there are) or when stripping makes two names one."""
        chosen: dict[str, str] = {}
        seen: dict[str, str] = {}
        for name in names:
            new = self.rename(name)
            if new is None:
                continue
            if new in seen:
                raise UsageError(
                    f"{seen[new]!r} and {name!r} would both be written as {new!r}",
                    hint="pass --keep-prefix to keep the names as they are",
                )
            seen[new] = name
            chosen[name] = new
        if not chosen and names:
            tops = sorted({n.split(".", 1)[0] for n in names})
            shown = ", ".join(tops[:20]) + (f" (and {len(tops) - 20} more)" if len(tops) > 20 else "")
            flags = " ".join(
                [*(f"--prefix {p}" for p in self.prefixes), *(f"--exclude {p}" for p in self.excludes)]
            )
            raise UsageError(f"{flags} selects no tensor; the top-level prefixes are: {shown}")
        return chosen
