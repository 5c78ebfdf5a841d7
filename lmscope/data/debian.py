"""Read-only queries of the dpkg database: is a package installed, at which version, which files it ships.

Reads ``<dpkg_dir>/status`` and ``<dpkg_dir>/info/<package>.list`` directly (no ``dpkg``
subprocess), so that a test can point ``dpkg_dir`` at a fake tree.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

DPKG_DIR = Path("/var/lib/dpkg")


@lru_cache(maxsize=8)
def _installed(status_path: Path, mtime_ns: int) -> dict[str, str]:
    versions: dict[str, str] = {}
    for stanza in status_path.read_text(encoding="utf-8", errors="replace").split("\n\n"):
        fields: dict[str, str] = {}
        for line in stanza.splitlines():
            if line and not line[0].isspace() and ":" in line:
                key, value = line.split(":", 1)
                fields[key] = value.strip()
        if "Package" in fields and fields.get("Status", "").endswith(" installed") and "Version" in fields:
            versions[fields["Package"]] = fields["Version"]
    return versions


def installed_version(package: str, dpkg_dir: Path = DPKG_DIR) -> str | None:
    """The installed version of ``package`` per ``<dpkg_dir>/status``, or ``None`` (not installed, or no database)."""
    status = Path(dpkg_dir) / "status"
    if not status.is_file():
        return None
    return _installed(status, status.stat().st_mtime_ns).get(package)


def package_files(package: str, dpkg_dir: Path = DPKG_DIR) -> list[str] | None:
    """The absolute paths ``package`` ships, per ``<dpkg_dir>/info/<package>[:<arch>].list``; ``None`` if there is no list."""
    info = Path(dpkg_dir) / "info"
    candidates = [info / f"{package}.list", *sorted(info.glob(f"{package}:*.list"))] if info.is_dir() else []
    for candidate in candidates:
        if candidate.is_file():
            return [line for line in candidate.read_text(encoding="utf-8", errors="replace").splitlines() if line.startswith("/")]
    return None
