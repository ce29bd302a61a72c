"""Read the completion markers of chosen units, not only their presence: what retention keeps must be whole.

The scan judges most units by the names in the listing (a present ``trainer_state.json``) and reads only the
newest markers. Before retention counts a unit as one of the K it keeps, its marker's contents are read once
(one small GET per unit on an object store): a marker cut short (a partial copy or restore, a storage fault)
makes the unit incomplete, so an older whole checkpoint is kept in its place.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence

from ckptctl.catalog.metrics import TrainerStateError, parse_trainer_state
from ckptctl.catalog.model import Layout, Status, Unit
from ckptctl.catalog.scan import TRAINER_STATE_LIMIT, trainer_state_verdict
from ckptctl.errors import CkptctlError
from ckptctl.storage.location import Location

# The JSON marker each layout writes last, whose contents can be checked with one read.
_JSON_MARKERS = {Layout.HF_TRAINER: "trainer_state.json", Layout.OLMO_CORE: ".metadata.json"}


def marker_checkable(unit: Unit) -> bool:
    return unit.kind == "dir" and unit.status is Status.COMPLETE and unit.layout in _JSON_MARKERS


def confirm_markers(location: Location, units: Sequence[Unit]) -> tuple[list[Unit], list[str]]:
    """Each unit as it is after reading its marker (incomplete or unknown when the marker does not parse),
    and a warning per marker that could not be read. Units already read by the scan are not read again."""
    confirmed: list[Unit] = []
    warnings: list[str] = []
    for unit in units:
        if not marker_checkable(unit) or unit.marker_checked:
            confirmed.append(unit)
            continue
        name = _JSON_MARKERS[unit.layout]
        rel = f"{unit.path}/{name}" if unit.path else name
        try:
            data = location.read_bytes(rel, max_bytes=TRAINER_STATE_LIMIT)
            if unit.layout is Layout.HF_TRAINER:
                parse_trainer_state(data)
            else:
                json.loads(data)
        except TrainerStateError as exc:
            verdict = trainer_state_verdict(exc)
            confirmed.append(dataclasses.replace(unit, status=verdict.status, reason=verdict.reason))
            continue
        except RecursionError:
            confirmed.append(
                dataclasses.replace(unit, status=Status.UNKNOWN, reason=f"{name} nested too deeply")
            )
            continue
        except ValueError as exc:
            reason = f"{name} is truncated or corrupt ({exc})"
            confirmed.append(dataclasses.replace(unit, status=Status.INCOMPLETE, reason=reason))
            continue
        except CkptctlError as exc:
            warnings.append(f"{rel}: could not be read to confirm it ({exc.message})")
            confirmed.append(dataclasses.replace(unit, status=Status.UNKNOWN, reason=f"{name} unreadable"))
            continue
        confirmed.append(dataclasses.replace(unit, marker_checked=True))
    return confirmed, warnings
