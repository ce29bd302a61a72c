"""The run catalog: a run's checkpoint units, their status, pointers and metrics."""

from ckptctl.catalog.model import Layout, Pointer, RunScan, Status, Unit, UnitFile

__all__ = ["Layout", "Pointer", "RunScan", "Status", "Unit", "UnitFile"]
