"""Storage: the only package that imports fsspec."""

from ckptctl.storage.location import FileEntry, Location, parse_storage_options

__all__ = ["FileEntry", "Location", "parse_storage_options"]
