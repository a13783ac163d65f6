"""Small stand-ins for the offline assets (same layout), so tests need no download."""

from __future__ import annotations

import bz2
import csv
import io
import json
import tarfile
from pathlib import Path

import numpy as np

POS = [
    "a moving and funny film",
    "brilliant acting and a great story",
    "a delight from start",
    "warm witty and wise",
    "one of the best of the year",
    "gorgeous and heartfelt",
]
NEG = [
    "a dull and tedious mess",
    "boring plot and bad acting",
    "an awful waste of time",
    "lifeless and flat",
    "the worst film of the year",
    "clumsy and dreary",
]
TOPICS = ("business", "entertainment", "politics", "sports", "tech")
WORDS = {
    "business": "profit shares market bank economy sales firm growth",
    "entertainment": "film music star award show actor band album",
    "politics": "minister election party vote labour government tory policy",
    "sports": "match team cup win player goal coach season",
    "tech": "software phone computer internet users mobile digital online",
}


def _manifest(d: Path) -> None:
    (d / "MANIFEST.json").write_text(json.dumps({"package": "fake", "files": {}}))


def make(root: Path, n_reviews: int = 400, n_articles: int = 40) -> Path:
    rng = np.random.default_rng(0)
    rt = root / "rotten_tomatoes"
    rt.mkdir(parents=True)
    rows = []
    for i in range(n_reviews):
        good = i % 2 == 0
        a, b = rng.choice(POS if good else NEG, 2, replace=False)
        rows.append(("fresh" if good else "rotten", f"{a} , {b} number {i}"))
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["category", "text", "movie_name", "has_plot_and_reviews"])
    w.writerow(["plot", "a plot summary that is not a review", "x", "True"])
    for cat, text in rows:
        w.writerow([cat, text, "m", "True"])
    (rt / "rotten_tomatoes_corpus_full.csv.bz2").write_bytes(bz2.compress(buf.getvalue().encode()))
    _manifest(rt)

    vader = root / "vader"
    vader.mkdir()
    lines = [
        f"{i}\t{(1.5 if c == 'fresh' else -1.5) + 0.1 * (i % 5)}\t{t}\r\n"
        for i, (c, t) in enumerate(rows)
    ]
    data = "".join(lines).encode()
    with tarfile.open(vader / "hutto_ICWSM_2014.tar.gz", "w:gz") as tf:
        info = tarfile.TarInfo("hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    _manifest(vader)

    bbc = root / "bbc"
    for t in TOPICS:
        (bbc / t).mkdir(parents=True)
        words = WORDS[t].split()
        for i in range(n_articles):
            head = " ".join(rng.choice(words, 4)) + f" {t} {i}"
            body = " ".join(rng.choice(words, 30))
            (bbc / t / f"{i:03d}.txt").write_text(f"{head}\n\n{body}.\n{body}.\n")
    _manifest(bbc)
    return root
