"""The default offline corpus: the builder on a fake Debian tree, missing packages, and a subset of the real packages."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
from data_fixtures import build_bpe_tokenizer

from lmscope.data.convert import man_alias_target, man_command
from lmscope.data.default_corpus import (
    DEBIAN_SOURCES,
    build_default_corpus,
    check_sources,
    ensure_default_corpus,
    read_documents_manifest,
)
from lmscope.data.readers import read_documents
from lmscope.data.tokenized import TokenizedCorpus
from lmscope.errors import LmscopeError

needs_man = pytest.mark.skipif(man_command() is None, reason="needs the man program (man-db)")

PACKAGES = {"python3.11-doc": "3.11.2-6", "git-doc": "1:2.39.5-0", "postgresql-doc-15": "15.20-0", "manpages": "6.03-2"}

MAN_PAGE = """.\\" a comment line
.TH {upper} {section} "2024-01-01" "fake 1.0" "Fake Manual"
.SH NAME
{name} \\- {summary}
.SH DESCRIPTION
.B {name}
{summary} with great care.
"""

PG_PAGE = """<?xml version="1.0" encoding="UTF-8"?><html><head><title>{title}</title></head><body>
<div class="navheader"><table><tr><td><a href="prev.html">Prev</a></td><th>Chapter 1. Navigation Bar</th></tr></table><hr /></div>
<div class="sect1"><h2>{title}</h2><p>PostgreSQL supports <code>{code}</code> and <a href="x.html">links</a>.</p>
<table><tr><th>Name</th><th>Size</th></tr><tr><td>int4</td><td>4 bytes</td></tr></table></div>
<div class="navfooter"><hr /><table><tr><td>Next page footer</td></tr></table></div></body></html>"""


def _write(path: Path, data: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return path


def fake_debian(prefix: Path, skip: tuple[str, ...] = ()) -> Path:
    """A tree laid out like a Debian system with the four documentation packages (minus ``skip``)."""
    owned_man = []
    if "python3.11-doc" not in skip:
        sources = prefix / "usr/share/doc/python3.11/html/_sources"
        _write(sources / "library/os.rst.txt", ":mod:`os` --- Miscellaneous operating system interfaces\n=====\n\nThis module provides a portable way.\n")
        _write(sources / "tutorial/index.rst.txt", "The Python Tutorial\n===================\n\nPython is an easy to learn language.\n")
        _write(sources / "about.rst.txt", "About these documents\n")
        _write(sources / "_static/ignored.js", "var x = 1;")
    if "git-doc" not in skip:
        git = prefix / "usr/share/doc/git-doc"
        _write(git / "git-add.txt", "git-add(1)\n==========\n\nNAME\n----\ngit-add - Add file contents to the index\n")
        _write(git / "howto/maintain-git.txt", "How to maintain Git\n")
        _write(git / "technical/pack-format.txt", b"Git pack format, caf\xe9 latin-1 byte\n")
        _write(git / "git-add.html", "<html>rendered, ignored</html>")
        _write(git / "changelog.gz", gzip.compress(b"changes"))
    if "postgresql-doc-15" not in skip:
        html = prefix / "usr/share/doc/postgresql-doc-15/html"
        _write(html / "datatype.html", PG_PAGE.format(title="8.1. Numeric Types", code="numeric(10, 2)"))
        _write(html / "sql-select.html", PG_PAGE.format(title="SELECT", code="SELECT 1"))
    if "manpages" not in skip:
        man = prefix / "usr/share/man"
        for section, name, summary in [("7", "hier", "description of the filesystem hierarchy"), ("5", "passwd", "the password file")]:
            page = MAN_PAGE.format(upper=name.upper(), section=section, name=name, summary=summary)
            owned_man.append(_write(man / f"man{section}/{name}.{section}.gz", gzip.compress(page.encode(), mtime=0)))
        owned_man.append(_write(man / "man7/alias.7.gz", gzip.compress(b'.\\" alias\n.so man7/hier.7\n', mtime=0)))
        (man / "man7/link.7.gz").symlink_to("hier.7.gz")
        owned_man.append(man / "man7/link.7.gz")
        _write(man / "man1/gcloud.1.gz", gzip.compress(MAN_PAGE.format(upper="G", section="1", name="gcloud", summary="other package").encode()))
    info = prefix / "var/lib/dpkg/info"
    info.mkdir(parents=True)
    stanzas = []
    for package, version in PACKAGES.items():
        if package not in skip:
            stanzas.append(f"Package: {package}\nStatus: install ok installed\nArchitecture: all\nVersion: {version}\n")
    (prefix / "var/lib/dpkg/status").write_text("\n".join(stanzas))
    if "manpages" not in skip:
        (info / "manpages.list").write_text("/.\n/usr/share/man\n" + "".join("/" + p.relative_to(prefix).as_posix() + "\n" for p in owned_man))
    return prefix


def _documents(path: Path) -> list:
    return list(read_documents(path))


@needs_man
def test_fake_tree_build(tmp_path):
    prefix = fake_debian(tmp_path / "root")
    built = build_default_corpus(tmp_path / "out", prefix=prefix, workers=1)
    documents = _documents(built.path)
    ids = [d.id for d in documents]
    assert ids == [
        "python-docs/about.rst.txt",
        "python-docs/library/os.rst.txt",
        "python-docs/tutorial/index.rst.txt",
        "git-docs/git-add.txt",
        "git-docs/howto/maintain-git.txt",
        "git-docs/technical/pack-format.txt",
        "postgres-docs/datatype.html",
        "postgres-docs/sql-select.html",
        "manpages/man5/passwd.5",
        "manpages/man7/hier.7",
    ]
    by_id = {d.id: d for d in documents}
    assert by_id["python-docs/library/os.rst.txt"].text.startswith(":mod:`os` ---")
    assert by_id["python-docs/library/os.rst.txt"].meta == {
        "package": "python3.11-doc", "version": "3.11.2-6", "path": "/usr/share/doc/python3.11/html/_sources/library/os.rst.txt"
    }
    assert "caf\ufffd" in by_id["git-docs/technical/pack-format.txt"].text
    pg = by_id["postgres-docs/datatype.html"].text
    assert "8.1. Numeric Types" in pg and "`numeric(10, 2)`" in pg and "int4" in pg
    assert "Navigation Bar" not in pg and "Next page footer" not in pg and "x.html" not in pg and "<" not in pg
    man = by_id["manpages/man7/hier.7"].text
    assert "NAME" in man and "hier - description of the filesystem hierarchy" in man and "great care" in man
    assert ".TH" not in man and ".SH" not in man and "\b" not in man and "\x1b" not in man

    manifest = json.loads((tmp_path / "out/manifest.json").read_text())
    assert manifest == built.manifest and read_documents_manifest(tmp_path / "out") == manifest
    sources = {s["domain"]: s for s in manifest["sources"]}
    assert sources["manpages"]["files"] == 3 and sources["manpages"]["skipped"]["alias"] == 1  # gcloud.1 is not the package's
    assert sources["git-docs"]["utf8_replaced"] == 1 and sources["postgres-docs"]["version"] == "15.20-0"
    assert manifest["counts"]["python-docs"] == {"documents": 3, "bytes": sum(len(d.text.encode()) for d in documents[:3])}
    assert manifest["total"]["documents"] == len(documents)
    assert manifest["documents_file"]["bytes"] == built.path.stat().st_size


@needs_man
def test_build_is_deterministic_across_worker_counts(tmp_path):
    prefix = fake_debian(tmp_path / "root")
    one = build_default_corpus(tmp_path / "one", prefix=prefix, workers=1)
    two = build_default_corpus(tmp_path / "two", prefix=prefix, workers=2)
    assert one.path.read_bytes() == two.path.read_bytes()
    limited = build_default_corpus(tmp_path / "limited", prefix=prefix, workers=1, limit_per_domain=1)
    assert [d.id for d in _documents(limited.path)] == [
        "python-docs/about.rst.txt", "git-docs/git-add.txt", "postgres-docs/datatype.html", "manpages/man5/passwd.5"
    ]


def test_missing_packages_are_named_with_the_fix(tmp_path):
    prefix = fake_debian(tmp_path / "root", skip=("git-doc", "manpages"))
    with pytest.raises(LmscopeError) as info:
        build_default_corpus(tmp_path / "out", prefix=prefix, workers=1)
    message = str(info.value)
    assert "Debian packages git-doc manpages" in message
    assert "apt-get install git-doc manpages" in message and "make corpus" in message
    assert message.count(".") >= 1 and "\n" not in message
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_man_alias_detection():
    assert man_alias_target(b'.\\" comment\n.so man3/foo.3\n') == "man3/foo.3"
    assert man_alias_target(b".TH FOO 1\n.SH NAME\n") is None


@needs_man
def test_ensure_default_corpus_builds_once_then_reuses(tmp_path):
    prefix = fake_debian(tmp_path / "root")
    tokenizer = str(build_bpe_tokenizer(tmp_path / "tok"))
    root = tmp_path / "corpora" / "default"
    first = ensure_default_corpus(tokenizer, root=root, prefix=prefix, workers=1)
    assert first.parent == root and first.name.startswith("tokenized-")
    corpus = TokenizedCorpus.open(first)
    assert len(corpus) == 10 and set(corpus.domains) == {"python-docs", "git-docs", "postgres-docs", "manpages"}
    stamp = (root / "documents.jsonl.zst").stat().st_mtime_ns, (first / "manifest.json").stat().st_mtime_ns
    assert ensure_default_corpus(tokenizer, root=root, prefix=prefix, workers=1) == first
    assert ((root / "documents.jsonl.zst").stat().st_mtime_ns, (first / "manifest.json").stat().st_mtime_ns) == stamp
    other = ensure_default_corpus(tokenizer, root=root, heldout_fraction=0.5, prefix=prefix, workers=1)
    assert other != first and TokenizedCorpus.open(other).manifest["split"]["heldout_fraction"] == 0.5


def _real_packages_present() -> bool:
    try:
        check_sources(DEBIAN_SOURCES)
    except LmscopeError:
        return False
    return True


@pytest.mark.skipif(not _real_packages_present(), reason="the Debian documentation packages are not installed")
def test_real_packages_subset(tmp_path):
    built = build_default_corpus(tmp_path / "real", limit_per_domain=4, workers=2)
    documents = _documents(built.path)
    domains = [d.domain for d in documents]
    assert list(dict.fromkeys(domains)) == ["python-docs", "git-docs", "postgres-docs", "manpages"]
    for source in built.manifest["sources"]:
        assert source["version"], source["package"]
        assert source["files"] == 4 and source["skipped"]["failed"] == 0, source["issues"]
        assert source["documents"] + sum(source["skipped"].values()) == 4
        assert source["documents"] == domains.count(source["domain"]) >= 1
    for document in documents:
        assert document.text.strip() and Path(document.meta["path"]).is_file()
        assert document.meta["path"].startswith("/usr/share/")
    man = [d for d in documents if d.domain == "manpages"]
    assert man and all("NAME" in d.text and "\b" not in d.text for d in man)
