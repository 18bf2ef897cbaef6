"""The installed package's version, for --version and anomaly_build_info."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version


def package_version() -> str:
    """The installed anomaly-scorer's version (pyproject.toml's), or 'unknown' outside an install."""
    try:
        return version("anomaly-scorer")
    except PackageNotFoundError:
        return "unknown"
