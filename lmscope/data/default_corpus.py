"""The default offline corpus: English documentation that Debian packages install, in four domains.

=================  ===================  ==============================================  ==========================
domain             Debian package       files                                           turned into text by
=================  ===================  ==============================================  ==========================
``python-docs``    python3.11-doc       ``/usr/share/doc/python3.11/html/_sources``     as is (reST sources)
``git-docs``       git-doc              ``/usr/share/doc/git-doc`` ``*.txt``            as is (AsciiDoc sources)
``postgres-docs``  postgresql-doc-15    ``/usr/share/doc/postgresql-doc-15/html``       html2text
``manpages``       manpages             the package's pages under ``/usr/share/man``    ``man -l`` (80 columns)
=================  ===================  ==============================================  ==========================

:func:`build_default_corpus` writes ``documents.jsonl.zst`` (one ``{id, domain, text,
meta}`` record per file, files in sorted order, so the output is deterministic for
given package versions) and then ``manifest.json`` (sources, package versions,
counts and bytes per domain, what was skipped and why) into
``$LMSCOPE_HOME/corpora/default/``. Man pages that only source another page
(``.so``) are aliases and are skipped, and counted. :func:`ensure_default_corpus`
builds it if needed and tokenizes it, caching the result beside it.

Every path is taken relative to ``prefix`` (default ``/``), so tests run the
builder on a fake tree laid out like a Debian system.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import re
import subprocess
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zstandard

import lmscope
from lmscope.data.convert import Converted, Converter, convert_job, man_command
from lmscope.data.debian import DPKG_DIR, installed_version, package_files
from lmscope.errors import LmscopeError
from lmscope.fsio import directory_lock
from lmscope.fsio import atomic_path, atomic_write_json, sha256_file
from lmscope.home import lmscope_home
from lmscope.progress import Progress, no_progress

DOCUMENTS_FILE = "documents.jsonl.zst"
MANIFEST_FILE = "manifest.json"
DOCUMENTS_FORMAT = "lmscope-documents"
#: Bump when the selection or conversion of files changes.
BUILDER_VERSION = 1
_ZSTD_LEVEL = 10
_MAX_ISSUES = 20


@dataclass(frozen=True)
class DomainSource:
    """One domain of the default corpus.

    Attributes:
        domain: domain name given to its documents.
        package: the Debian package that installs the files.
        root: absolute directory of the files on a Debian system (taken relative to the build's ``prefix``).
        patterns: glob patterns relative to ``root`` selecting the files.
        converter: ``text`` (as is), ``html`` (html2text) or ``man`` (``man -l``).
        owned_only: keep only the files that dpkg lists for ``package`` (for shared directories like ``/usr/share/man``).
    """

    domain: str
    package: str
    root: str
    patterns: tuple[str, ...]
    converter: Converter
    owned_only: bool = False


DEBIAN_SOURCES: tuple[DomainSource, ...] = (
    DomainSource("python-docs", "python3.11-doc", "/usr/share/doc/python3.11/html/_sources", ("**/*.rst.txt",), "text"),
    DomainSource("git-docs", "git-doc", "/usr/share/doc/git-doc", ("*.txt", "howto/*.txt", "technical/*.txt"), "text"),
    DomainSource("postgres-docs", "postgresql-doc-15", "/usr/share/doc/postgresql-doc-15/html", ("*.html",), "html"),
    DomainSource("manpages", "manpages", "/usr/share/man", ("man[1-8]/*",), "man", owned_only=True),
)


@dataclass
class BuiltDocuments:
    """The result of a build: the documents file and its manifest."""

    path: Path
    manifest: dict[str, Any] = field(default_factory=dict)


def default_corpus_dir() -> Path:
    """``$LMSCOPE_HOME/corpora/default``."""
    return lmscope_home() / "corpora" / "default"


def _under(prefix: Path, absolute: str) -> Path:
    return prefix / absolute.lstrip("/")


def _debian_path(prefix: Path, path: Path) -> str:
    return "/" + path.relative_to(prefix).as_posix()


def check_sources(sources: Sequence[DomainSource], prefix: Path = Path("/"), dpkg_dir: Path | None = None) -> None:
    """Raise one :class:`LmscopeError` naming every package whose files are missing, and how to install it."""
    dpkg_dir = dpkg_dir if dpkg_dir is not None else _under(prefix, str(DPKG_DIR))
    missing = []
    for source in sources:
        root = _under(prefix, source.root)
        if not root.is_dir() or (source.owned_only and package_files(source.package, dpkg_dir) is None):
            missing.append((source.package, root))
    if missing:
        packages = " ".join(package for package, _ in missing)
        where = ", ".join(str(root) for _, root in missing)
        noun = "package" if len(missing) == 1 else "packages"
        raise LmscopeError(
            f"the default corpus needs the Debian {noun} {packages} (not found: {where}); "
            f"install with `apt-get install {packages}`, or run `make corpus`."
        )
    if any(source.converter == "man" for source in sources) and man_command() is None:
        raise LmscopeError("rendering man pages needs the `man` program; install it with `apt-get install man-db`, or run `make corpus`.")


def source_files(source: DomainSource, prefix: Path = Path("/"), dpkg_dir: Path | None = None, limit: int | None = None) -> list[Path]:
    """The files of one domain, sorted by path relative to its root (regular files only; symlinks are aliases)."""
    dpkg_dir = dpkg_dir if dpkg_dir is not None else _under(prefix, str(DPKG_DIR))
    root = _under(prefix, source.root)
    found = {path for pattern in source.patterns for path in root.glob(pattern) if path.is_file() and not path.is_symlink()}
    if source.owned_only:
        owned = {str(_under(prefix, listed)) for listed in package_files(source.package, dpkg_dir) or []}
        found = {path for path in found if str(path) in owned}
    files = sorted(found, key=lambda path: path.relative_to(root).as_posix())
    return files[:limit] if limit is not None else files


def _document_id(source: DomainSource, root: Path, path: Path) -> str:
    relative = path.relative_to(root).as_posix()
    if source.converter == "man" and relative.endswith(".gz"):
        relative = relative[: -len(".gz")]
    return f"{source.domain}/{relative}"


def _converted(jobs: list[tuple[Converter, str]], workers: int) -> Iterator[Converted]:
    """Convert files in order, in a process pool when ``workers > 1``."""
    if workers <= 1 or len(jobs) < 2:
        yield from map(convert_job, jobs)
        return
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        yield from pool.map(convert_job, jobs, chunksize=4)


def _tool_versions(sources: Sequence[DomainSource]) -> dict[str, str]:
    import html2text

    tools = {}
    if any(source.converter == "html" for source in sources):
        tools["html2text"] = ".".join(str(part) for part in html2text.__version__)
    if any(source.converter == "man" for source in sources):
        try:
            tools["man"] = subprocess.run([man_command() or "man", "--version"], capture_output=True, text=True, check=False).stdout.strip()
        except OSError:
            tools["man"] = "unknown"
    return tools


def build_default_corpus(
    out_dir: str | os.PathLike[str] | None = None,
    *,
    prefix: str | os.PathLike[str] = "/",
    sources: Sequence[DomainSource] = DEBIAN_SOURCES,
    dpkg_dir: str | os.PathLike[str] | None = None,
    limit_per_domain: int | None = None,
    workers: int | None = None,
    progress: Progress = no_progress,
) -> BuiltDocuments:
    """Assemble the default corpus's documents file and manifest (see the module docstring).

    Args:
        out_dir: where to write ``documents.jsonl.zst`` and ``manifest.json`` (default :func:`default_corpus_dir`).
        prefix: the file system root the Debian paths are taken under (``/``; a fake tree in tests).
        sources: the domains to assemble.
        dpkg_dir: the dpkg database (default ``<prefix>/var/lib/dpkg``).
        limit_per_domain: keep only the first N files of each domain (for quick checks).
        workers: conversion processes (default: the CPUs available).
        progress: receives one task per domain, advancing per file.

    Returns:
        the documents file and its manifest. The manifest is written last; without it the
        directory does not hold a finished build.
    """
    started = time.perf_counter()
    prefix = Path(prefix)
    dpkg = Path(dpkg_dir) if dpkg_dir is not None else _under(prefix, str(DPKG_DIR))
    out = Path(out_dir) if out_dir is not None else default_corpus_dir()
    check_sources(sources, prefix, dpkg)
    workers = workers or len(os.sched_getaffinity(0))
    listing = [(source, source_files(source, prefix, dpkg, limit_per_domain)) for source in sources]
    for source, files in listing:
        if not files:
            raise LmscopeError(f"no files of the Debian package {source.package} match {', '.join(source.patterns)} under {_under(prefix, source.root)}; reinstall it with `apt-get install --reinstall {source.package}`.")
    jobs = [(source.converter, str(path)) for source, files in listing for path in files]
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST_FILE).unlink(missing_ok=True)  # the directory is unfinished until the new manifest lands
    reports = []
    results = _converted(jobs, workers)
    try:
        with atomic_path(out / DOCUMENTS_FILE) as tmp:
            with open(tmp, "wb") as raw, zstandard.ZstdCompressor(level=_ZSTD_LEVEL).stream_writer(raw, closefd=False) as sink:
                for source, files in listing:
                    reports.append(_write_domain(source, files, prefix, dpkg, results, sink, progress))
    finally:
        results.close()  # shuts the process pool down, also on error
    manifest = _manifest(out, sources, reports, limit_per_domain, workers, started)
    atomic_write_json(out / MANIFEST_FILE, manifest)
    return BuiltDocuments(path=out / DOCUMENTS_FILE, manifest=manifest)


def _write_domain(
    source: DomainSource,
    files: list[Path],
    prefix: Path,
    dpkg_dir: Path,
    results: Iterator[Converted],
    sink: Any,
    progress: Progress,
) -> dict[str, Any]:
    root = _under(prefix, source.root)
    version = installed_version(source.package, dpkg_dir)
    report: dict[str, Any] = {
        "domain": source.domain,
        "package": source.package,
        "version": version,
        "root": source.root,
        "patterns": list(source.patterns),
        "converter": source.converter,
        "files": len(files),
        "documents": 0,
        "bytes": 0,
        "skipped": {"alias": 0, "empty": 0, "failed": 0},
        "utf8_replaced": 0,
        "issues": [],
    }
    for path in files:
        converted = next(results)
        progress(source.domain, advance=1, total=len(files))
        if converted.text is None:
            report["skipped"][converted.skipped or "failed"] += 1
            if converted.skipped == "failed" and len(report["issues"]) < _MAX_ISSUES:
                report["issues"].append(f"{_debian_path(prefix, path)}: {converted.detail}")
            continue
        record = {
            "id": _document_id(source, root, path),
            "domain": source.domain,
            "text": converted.text,
            "meta": {"package": source.package, "version": version, "path": _debian_path(prefix, path)},
        }
        sink.write(json.dumps(record, ensure_ascii=False).encode("utf-8") + b"\n")
        report["documents"] += 1
        report["bytes"] += len(converted.text.encode("utf-8"))
        report["utf8_replaced"] += int(converted.utf8_replaced)
    return report


def _manifest(out: Path, sources: Sequence[DomainSource], reports: list[dict[str, Any]], limit: int | None, workers: int, started: float) -> dict[str, Any]:
    documents = out / DOCUMENTS_FILE
    return {
        "format": DOCUMENTS_FORMAT,
        "format_version": 1,
        "builder_version": BUILDER_VERSION,
        "lmscope_version": lmscope.__version__,
        "documents_file": {"name": DOCUMENTS_FILE, "bytes": documents.stat().st_size, "sha256": sha256_file(documents)},
        "limit_per_domain": limit,
        "tools": _tool_versions(sources),
        "counts": {report["domain"]: {"documents": report["documents"], "bytes": report["bytes"]} for report in reports},
        "total": {"documents": sum(r["documents"] for r in reports), "bytes": sum(r["bytes"] for r in reports)},
        "sources": reports,
        "run": {"seconds": round(time.perf_counter() - started, 3), "workers": workers},
    }


def read_documents_manifest(directory: Path) -> dict[str, Any] | None:
    """The manifest of a finished documents build in ``directory`` whose documents file is intact in size, else ``None``."""
    manifest_path = Path(directory) / MANIFEST_FILE
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("format") != DOCUMENTS_FORMAT:
        return None
    documents = Path(directory) / manifest.get("documents_file", {}).get("name", DOCUMENTS_FILE)
    if not documents.is_file() or documents.stat().st_size != manifest["documents_file"].get("bytes"):
        return None
    return manifest


def ensure_default_documents(root: str | os.PathLike[str] | None = None, progress: Progress = no_progress, **build_options: Any) -> Path:
    """The default corpus's documents file, built first if there is no finished build in ``root``."""
    root = Path(root) if root is not None else default_corpus_dir()
    if read_documents_manifest(root) is None:
        with directory_lock(root):
            if read_documents_manifest(root) is None:
                build_default_corpus(root, progress=progress, **build_options)
    return root / DOCUMENTS_FILE


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.")[:60] or "tokenizer"


def tokenized_dir_name(tokenizer_spec: str, heldout_fraction: float, documents_sha256: str) -> str:
    """``tokenized-<spec>-<key>``, the key hashing everything that determines the tokenized corpus."""
    from lmscope.data.tokenized import FORMAT_VERSION
    from lmscope.data.split import SPLIT_VERSION

    key = json.dumps(
        {"tokenizer": tokenizer_spec, "heldout_fraction": heldout_fraction, "documents": documents_sha256, "format": FORMAT_VERSION, "split": SPLIT_VERSION},
        sort_keys=True,
    )
    return f"tokenized-{_slug(tokenizer_spec)}-{hashlib.sha256(key.encode('utf-8')).hexdigest()[:12]}"


def ensure_default_corpus(
    tokenizer_spec: str = "default",
    progress: Progress = no_progress,
    *,
    root: str | os.PathLike[str] | None = None,
    heldout_fraction: float = 0.05,
    **build_options: Any,
) -> Path:
    """The default corpus tokenized with ``tokenizer_spec``: built and tokenized on first use, then cached.

    Documents live in ``root`` (default ``$LMSCOPE_HOME/corpora/default``); the tokenized corpus in
    ``root/tokenized-<spec>-<key>``, named by the tokenizer spec, the held-out fraction and the
    documents' hash. ``build_options`` go to :func:`build_default_corpus` (``prefix``, ``workers``, …).

    Returns:
        the tokenized corpus directory (open it with :meth:`lmscope.data.tokenized.TokenizedCorpus.open`).
    """
    from lmscope.data.tokenize_job import tokenize_corpus
    from lmscope.data.tokenized import TokenizedCorpus

    root = Path(root) if root is not None else default_corpus_dir()
    documents = ensure_default_documents(root, progress, **build_options)
    manifest = read_documents_manifest(root) or {}
    out = root / tokenized_dir_name(tokenizer_spec, heldout_fraction, manifest.get("documents_file", {}).get("sha256", ""))
    if (out / "manifest.json").is_file():
        TokenizedCorpus.open(out)
        return out
    tokenize_corpus(documents, tokenizer_spec, out, heldout_fraction=heldout_fraction, progress=progress)
    return out
