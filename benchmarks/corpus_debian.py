"""A benchmark corpus of real English text from Debian documentation packages, built reproducibly.

    apt-get install -y --no-install-recommends linux-doc-6.1 python3.11-doc perl-doc postgresql-doc-15 git-doc \
        python-django-doc nodejs-doc debian-handbook cmake-doc python-scipy-doc sphinx-doc rust-doc erlang-doc \
        python-sqlalchemy-doc octave-doc postfix-doc exim4-doc-html python-flask-doc python-werkzeug-doc apache2-doc
    python benchmarks/corpus_debian.py            # -> $RAYPATCH_BENCH_CACHE/debian-docs/ (default /tmp/...)

HTML pages go through Python's HTML parser (html.parser): the text of the page body, without scripts, styles,
navigation bars, sidebars, headers and footers, with a line break at every block element; POD goes through Perl's
own pod2text. Dropped: index, search and generated listing pages, pages under 400 characters of text, exact
duplicates, and near-duplicates (MinHash over 5-word shingles, estimated Jaccard similarity >= 0.8 with a page kept
earlier). The documents are shuffled with a fixed seed and written as corpus.jsonl.gz beside PROVENANCE.md
(packages, versions, licences as their copyright files state them) and stats.json (counts and package versions).
The text depends on the packages' versions: Debian point releases change them, so benchmarks record the text's
sha256 and the versions with their results (_common.corpus_identity) and refuse to pair runs across corpora.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import html.parser
import json
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

# (package, files, how): every HTML page or POD file of the package that holds English prose.
SOURCES = [
    ("linux-doc-6.1", "/usr/share/doc/linux-doc-6.1/html/**/*.html", "html"),
    ("python3.11-doc", "/usr/share/doc/python3.11/html/**/*.html", "html"),
    ("perl-doc", "/usr/share/perl/5.36/pod/*.pod", "pod"),
    ("postgresql-doc-15", "/usr/share/doc/postgresql-doc-15/html/*.html", "html"),
    ("git-doc", "/usr/share/doc/git-doc/*.html", "html"),
    ("python-django-doc", "/usr/share/doc/python-django-doc/html/**/*.html", "html"),
    ("nodejs-doc", "/usr/share/doc/nodejs/api/*.html", "html"),
    ("debian-handbook", "/usr/share/doc/debian-handbook/html/en-US/*.html", "html"),
    ("cmake-data", "/usr/share/doc/cmake-data/html/**/*.html", "html"),
    ("python-scipy-doc", "/usr/share/doc/python-scipy-doc/html/**/*.html", "html"),
    ("sphinx-doc", "/usr/share/doc/sphinx-doc/html/**/*.html", "html"),
    ("rust-doc", "/usr/share/doc/rust-doc/html/**/*.html", "html"),
    ("erlang-doc", "/usr/share/doc/erlang-doc/**/*.html", "html"),
    ("python-sqlalchemy-doc", "/usr/share/doc/python-sqlalchemy-doc/html/**/*.html", "html"),
    ("octave-doc", "/usr/share/doc/octave/**/*.html", "html"),
    ("postfix-doc", "/usr/share/doc/postfix/html/*.html", "html"),
    ("exim4-doc-html", "/usr/share/doc/exim4-doc-html/**/*.html", "html"),
    ("python-flask-doc", "/usr/share/doc/python-flask-doc/html/**/*.html", "html"),
    ("python-werkzeug-doc", "/usr/share/doc/python-werkzeug-doc/html/**/*.html", "html"),
    ("apache2-doc", "/usr/share/doc/apache2-doc/manual/en/**/*.html", "html"),
]
# Per package: generated pages that are no prose (rustdoc's source listings and trait implementor lists, the
# core and alloc crates that std re-exports, mdBook's print.html, which repeats a whole book on one page).
SKIP_IN = {"rust-doc": re.compile(r"(^|/)(src|implementors|core|alloc|test|proc_macro)/|(^|/)print\.html$")}
SKIP_PAGES = re.compile(r"(^|/)(genindex|search|py-modindex|modindex|index-\w+|bookindex|_sources|_static|_modules|"
                        r"_images|_downloads)(/|\.html$|-)")
SKIP_TAGS = {"script", "style", "nav", "header", "footer", "head", "noscript", "svg", "form", "button"}
SKIP_CLASSES = {"sphinxsidebar", "related", "footer", "navheader", "navfooter", "headerlink", "sidebar",
                "breadcrumbs", "wy-nav-side", "rst-footer-buttons", "toc", "toctree-wrapper", "highlight-default"}
BLOCK = {"p", "div", "li", "pre", "br", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "dt", "dd", "section", "table",
         "blockquote", "ul", "ol", "dl", "article"}
VOID = {"br", "img", "hr", "meta", "link", "input", "area", "base", "col", "embed", "source", "track", "wbr"}


class PageText(html.parser.HTMLParser):
    """The visible prose of an HTML page (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.stack: list[bool] = []  # per open element: is it (or an ancestor) skipped?
        self.pre = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        classes = set((dict(attrs).get("class") or "").split())
        skipped = (bool(self.stack) and self.stack[-1]) or tag in SKIP_TAGS or bool(classes & SKIP_CLASSES) \
            or dict(attrs).get("role") == "navigation"
        if tag in BLOCK:
            self.parts.append("\n")
        if tag not in VOID:
            self.stack.append(skipped)
            self.pre += tag == "pre"

    def handle_endtag(self, tag: str) -> None:
        if tag in VOID or not self.stack:
            return
        self.stack.pop()
        self.pre -= tag == "pre" and self.pre > 0
        if tag in BLOCK:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if self.stack and self.stack[-1]:
            return
        self.parts.append(data if self.pre else re.sub(r"\s+", " ", data))

    def text(self) -> str:
        lines = [ln.rstrip() for ln in "".join(self.parts).splitlines()]
        return re.sub(r"\n{3,}", "\n\n", "\n".join(ln if ln.strip() else "" for ln in lines)).strip()


def page_text(path: Path, how: str) -> str:
    if how == "pod":
        return subprocess.run(["pod2text", "--utf8", str(path)], capture_output=True, text=True, encoding="utf-8",
                              errors="replace", check=False).stdout.strip()
    p = PageText()
    p.feed(path.read_text(errors="replace"))
    p.close()
    return p.text()


class NearDuplicates:
    """MinHash over 5-word shingles with LSH bands: is a page a near-copy of one kept before?"""

    def __init__(self, num_hashes: int = 64, bands: int = 16, threshold: float = 0.8, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.a = rng.integers(1, (1 << 61) - 1, num_hashes, dtype=np.uint64)
        self.b = rng.integers(0, (1 << 61) - 1, num_hashes, dtype=np.uint64)
        self.bands, self.rows, self.threshold = bands, num_hashes // bands, threshold
        self.buckets: dict[tuple[int, bytes], int] = {}
        self.kept: list[np.ndarray] = []

    def signature(self, text: str) -> np.ndarray:
        words = text.lower().split()
        shingles = {" ".join(words[i:i + 5]) for i in range(max(1, len(words) - 4))}
        x = np.array([int.from_bytes(hashlib.blake2b(s.encode(), digest_size=8).digest(), "little") >> 3
                      for s in shingles], dtype=np.uint64)
        return (np.outer(x, self.a) + self.b).min(axis=0)  # wraps mod 2^64: a fixed random permutation family

    def seen(self, text: str) -> bool:
        sig = self.signature(text)
        keys = [(i, sig[i * self.rows:(i + 1) * self.rows].tobytes()) for i in range(self.bands)]
        for k in keys:
            j = self.buckets.get(k)
            if j is not None and float((self.kept[j] == sig).mean()) >= self.threshold:
                return True
        for k in keys:
            self.buckets.setdefault(k, len(self.kept))
        self.kept.append(sig)
        return False


def package_info(pkg: str) -> dict[str, str]:
    version = subprocess.run(["dpkg-query", "-W", "-f=${Version}", pkg], capture_output=True, text=True).stdout
    copyright_file = Path("/usr/share/doc") / pkg / "copyright"
    licences = []
    if copyright_file.exists():
        found = re.findall(r"^License:\s*(.+)$", copyright_file.read_text(errors="replace"), flags=re.M)
        # Machine-readable copyright files name licences (short identifiers); free-form ones quote prose.
        licences = sorted({m.strip() for m in found if len(m.strip()) <= 40 and re.search(r"[A-Za-z]", m)})
    return {"package": pkg, "version": version or "not installed", "copyright": str(copyright_file),
            "licences": ", ".join(licences[:8]) or "see the copyright file"}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(C.CACHE / "debian-docs"), help="output directory (outside the repository)")
    ap.add_argument("--min-chars", type=int, default=400)
    ap.add_argument("--seed", type=int, default=0, help="shuffle seed")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    near = NearDuplicates()
    exact: set[bytes] = set()
    docs: list[str] = []
    stats: dict[str, dict[str, int]] = {}
    for pkg, pattern, how in SOURCES:
        root = Path(pattern.split("*")[0])
        files = sorted(f for f in root.glob(pattern[len(str(root)) + 1:]) if f.is_file()) if root.exists() else []
        st = stats[pkg] = {"files": len(files), "kept": 0, "chars": 0, "skipped_pages": 0, "short": 0,
                           "exact_duplicates": 0, "near_duplicates": 0}
        for f in files:
            rel = str(f.relative_to(root))
            if SKIP_PAGES.search(rel) or (pkg in SKIP_IN and SKIP_IN[pkg].search(rel)):
                st["skipped_pages"] += 1
                continue
            text = page_text(f, how)
            if len(text) < args.min_chars:
                st["short"] += 1
                continue
            key = hashlib.blake2b(" ".join(text.split()).encode(), digest_size=16).digest()
            if key in exact:
                st["exact_duplicates"] += 1
                continue
            exact.add(key)
            if near.seen(text):
                st["near_duplicates"] += 1
                continue
            docs.append(text)
            st["kept"] += 1
            st["chars"] += len(text)
        print(f"{pkg}: {st}", flush=True)
    random.Random(args.seed).shuffle(docs)
    tmp = out / ".corpus.jsonl.gz.tmp"
    # mtime=0: the same text gives the same file, so the shard cache (keyed by the file's hash) is reused.
    with open(tmp, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz:
        for d in docs:
            gz.write((json.dumps({"text": d}) + "\n").encode())
    tmp.replace(out / "corpus.jsonl.gz")
    infos = [package_info(s[0]) for s in SOURCES]
    # The versions name the text: Debian point releases change documentation packages, and with them the corpus
    # (benchmarks read them through _common.corpus_identity and record them with their results).
    total = {"documents": len(docs), "chars": sum(len(d) for d in docs), "seconds": time.perf_counter() - t0,
             "packages": stats, "seed": args.seed, "versions": {i["package"]: i["version"] for i in infos}}
    (out / "stats.json").write_text(json.dumps(total, indent=1) + "\n")
    rows = [[i["package"], i["version"], i["licences"], i["copyright"]] for i in infos]
    (out / "PROVENANCE.md").write_text(
        "# Debian documentation corpus\n\nBuilt by `python benchmarks/corpus_debian.py` (raypatch) from these "
        "installed Debian packages; each document keeps its package's licence, as its copyright file states.\n\n"
        + C.md_table(["package", "version", "licences (copyright file)", "copyright file"], rows)
        + f"\n\n{len(docs):,} documents, {total['chars']:,} characters, shuffled with seed {args.seed}.\n")
    print(f"{len(docs):,} documents, {total['chars'] / 1e6:.1f} M characters -> {out / 'corpus.jsonl.gz'}")
    return total


if __name__ == "__main__":
    main()
