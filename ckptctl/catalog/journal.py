"""The prune journal: the run-level tombstone that makes deletion survive ``kill -9``.

``prune`` writes ``.ckptctl-deleting.json`` (the units it is about to delete) before it removes anything. While
the journal names a unit, the catalog reports that unit ``incomplete`` (never complete, never counted), and the
next prune finishes deleting it. One object for the whole batch keeps this to O(1) requests on object stores.
"""

from __future__ import annotations

import json

JOURNAL_NAME = ".ckptctl-deleting.json"


def encode_journal(units: list[str], started: float) -> bytes:
    return json.dumps({"ckptctl_journal_version": 1, "started": started, "units": sorted(units)}).encode()


def decode_journal(data: bytes) -> set[str]:
    """Unit paths a journal names; raises ValueError when it is not a journal."""
    payload = json.loads(data)
    units = payload.get("units") if isinstance(payload, dict) else None
    if not isinstance(units, list) or not all(isinstance(u, str) for u in units):
        raise ValueError("not a ckptctl journal")
    return set(units)
