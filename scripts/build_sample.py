"""Build the shipped sample corpus `data/sample/redpajama/` (RedPajama-1T-Sample layout) from real, freely
licensed text carried by PyPI source distributions and by the Python standard library.

Re-runnable: it downloads pinned sdists with pip into a temporary directory and rewrites the sample files.
Nothing comes from a model or dataset hub. Provenance and licenses: data/sample/PROVENANCE.md.

    .venv/bin/python scripts/build_sample.py
"""

from __future__ import annotations

import ast
import bz2
import hashlib
import html
import json
import re
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "data" / "sample" / "redpajama"
SDISTS = ["sentencepiece==0.2.3", "gensim==4.4.0", "sqlalchemy==2.1.9"]
TIMESTAMP = "2023-03-20T00:00:00"
CAPS = {"wikipedia": 900_000, "github": 800_000, "c4": 700_000, "common_crawl": 700_000, "arxiv": 400_000}


def download(workdir: Path) -> Path:
    """Fetch and unpack the pinned sdists; returns the folder holding them."""
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-binary", ":all:", "--no-deps",
                    "--no-build-isolation", "-d", str(workdir), *SDISTS], check=True)
    for archive in sorted(workdir.glob("*.tar.gz")):
        with tarfile.open(archive) as tar:
            tar.extractall(workdir, filter="data")
    return workdir


def capped(docs: list[dict], cap: int) -> list[dict]:
    """The first documents whose text adds up to at most `cap` bytes."""
    kept, total = [], 0
    for doc in docs:
        size = len(doc["text"].encode())
        if total + size > cap and kept:
            break
        kept.append(doc)
        total += size
    return kept


def book(src: Path) -> list[dict]:
    text = (src / "sentencepiece-0.2.3/test/botchan.txt").read_text(encoding="utf-8")
    return [{"text": text, "meta": {"short_book_title": "Botchan by Natsume Soseki (English translation)",
                                    "publication_date": 1906, "url": "https://www.gutenberg.org/ebooks/8868"}}]


def _clean_wikitext(text: str) -> str:
    """A light pass from wiki markup to plain prose, like RedPajama's wikipedia text."""
    text = html.unescape(text)
    for _ in range(3):
        text = re.sub(r"\{\{[^{}]*\}\}", "", text)
    text = re.sub(r"<ref[^>]*/>|<ref[^>]*>.*?</ref>", "", text, flags=re.S)
    text = re.sub(r"<!--.*?-->|<[^>]+>", "", text, flags=re.S)
    text = re.sub(r"\[\[(?:File|Image|Category):[^\]]*\]\]", "", text)
    text = re.sub(r"\[\[(?:[^|\]]*\|)?([^\]]*)\]\]", r"\1", text)
    text = re.sub(r"\[https?://\S+ ([^\]]*)\]", r"\1", text)
    text = re.sub(r"'{2,}", "", text)
    text = re.sub(r"^=+\s*(.*?)\s*=+\s*$", r"\1", text, flags=re.M)
    text = re.sub(r"^\{\|.*?^\|\}", "", text, flags=re.M | re.S)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def wikipedia(src: Path) -> list[dict]:
    dump = (src / "gensim-4.4.0/gensim/test/test_data"
            / "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2")
    xml = bz2.decompress(dump.read_bytes()).decode("utf-8")
    docs = []
    for page in re.findall(r"<page>(.*?)</page>", xml, flags=re.S):
        title = re.search(r"<title>(.*?)</title>", page).group(1)
        body = re.search(r"<text[^>]*>(.*?)</text>", page, flags=re.S)
        text = _clean_wikitext(body.group(1)) if body else ""
        if len(text) > 500 and not text.startswith("#REDIRECT"):
            slug = title.replace(" ", "_")
            docs.append({"text": f"{title}\n\n{text}", "meta": {
                "title": title, "url": f"https://en.wikipedia.org/wiki/{slug}", "language": "en",
                "timestamp": "20230320"}})
    return capped(docs, CAPS["wikipedia"])


def github() -> list[dict]:
    stdlib = Path(sysconfig.get_path("stdlib"))
    docs = []
    for path in sorted(stdlib.glob("[a-s]*.py")):
        text = path.read_text(encoding="utf-8")
        lines = text.splitlines()
        docs.append({"text": text, "meta": {
            "content_hash": hashlib.md5(text.encode()).hexdigest(), "timestamp": "", "source": "github",
            "line_count": len(lines), "max_line_length": max(map(len, lines), default=0),
            "avg_line_length": sum(map(len, lines)) / max(1, len(lines)),
            "alnum_prop": sum(c.isalnum() for c in text) / max(1, len(text)),
            "repo_name": "python/cpython", "id": hashlib.sha1(path.name.encode()).hexdigest(),
            "size": str(len(text.encode())), "binary": False, "copies": "1", "ref": f"refs/heads/{sys.version[:4]}",
            "path": f"Lib/{path.name}", "mode": "33188", "license": "PSF-2.0",
            "language": [{"name": "Python", "bytes": str(len(text.encode()))}]}})
    return capped(docs, CAPS["github"])


def _rst_pages(folder: Path) -> list[tuple[Path, str]]:
    return [(p, p.read_text(encoding="utf-8")) for p in sorted(folder.rglob("*.rst"))]


def c4(src: Path) -> list[dict]:
    docs = []
    for sub in ("tutorial", "orm", "core"):
        for path, text in _rst_pages(src / "sqlalchemy-2.1.9/doc/build" / sub):
            page = path.relative_to(src / "sqlalchemy-2.1.9/doc/build").with_suffix(".html")
            docs.append({"text": text, "meta": {"timestamp": "2019-04-25T12:57:54Z",
                                                "url": f"https://docs.sqlalchemy.org/en/20/{page}"}})
    return capped(docs, CAPS["c4"])


def common_crawl(src: Path) -> list[dict]:
    """SQLAlchemy's changelog, one release's notes per page, as flat common_crawl records."""
    docs = []
    for path, text in _rst_pages(src / "sqlalchemy-2.1.9/doc/build/changelog"):
        for number, release in enumerate(text.split("\n.. changelog::")[1:]):
            if len(release) > 1000:
                docs.append({"text": ".. changelog::" + release.rstrip(), "pred_label": "__label__wiki",
                             "pred_label_prob": 0.71, "wiki_prob": 0.71,
                             "source": f"cc/2019-30/sqlalchemy-changelog/{path.stem}/{number}"})
    return capped(docs, CAPS["common_crawl"])


def stackexchange(src: Path) -> list[dict]:
    """Each question of SQLAlchemy's FAQ (a heading underlined with dashes) with its answer."""
    docs = []
    for path, text in _rst_pages(src / "sqlalchemy-2.1.9/doc/build/faq"):
        parts = re.split(r"\n(?=[^\n]+\n-{3,}\n)", text)
        for number, part in enumerate(parts[1:], start=1):
            if len(part) > 300:
                docs.append({"text": part.strip(), "meta": {
                    "language": "en", "url": f"https://docs.sqlalchemy.org/en/20/faq/{path.stem}.html#q{number}",
                    "timestamp": "2023-03-29", "source": "stackexchange", "question_score": "1"}})
    return docs


def arxiv(src: Path) -> list[dict]:
    """Gensim's model documentation (algorithms, math, paper references), one module per document."""
    docs = []
    for path in sorted((src / "gensim-4.4.0/gensim/models").glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        nodes = [tree] + [n for n in ast.walk(tree) if isinstance(n, ast.ClassDef | ast.FunctionDef)]
        strings = [ast.get_docstring(n, clean=True) for n in nodes]
        text = "\n\n".join(s for s in strings if s)
        if len(text) > 2000:
            docs.append({"text": text, "meta": {"timestamp": "2023-03-20T00:00:00", "yymm": "2303",
                                                "arxiv_id": f"gensim.models.{path.stem}", "language": "en",
                                                "url": f"https://radimrehurek.com/gensim/models/{path.stem}.html"}})
    return capped(docs, CAPS["arxiv"])


def write_jsonl(path: Path, docs: list[dict]) -> None:
    temporary = path.with_suffix(".tmp")
    with open(temporary, "w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps(doc, ensure_ascii=False) + "\n")
    temporary.replace(path)


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        src = download(Path(tmp))
        subsets = {
            "arxiv_sample.jsonl": arxiv(src), "book_sample.jsonl": book(src), "c4_sample.jsonl": c4(src),
            "cc_2019-30_sample.jsonl": common_crawl(src), "github_sample.jsonl": github(),
            "stackexchange_sample.jsonl": stackexchange(src), "wikipedia_sample.jsonl": wikipedia(src),
        }
        for name, docs in subsets.items():
            write_jsonl(OUT / name, docs)
            print(f"{name}: {len(docs)} documents, {(OUT / name).stat().st_size:,} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
