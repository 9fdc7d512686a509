"""Sentiment scoring: per-call time of TextBlob's call and of chatmw's fast path, same run.

Texts come from tests/fixtures/sentiment/chat_texts.json, or from the ``text`` column of a
CSV file (``--csv``, user rows only when it has a ``role`` column). Each round times every
variant once over all texts with ``timeit``, alternating variants so that load from other
processes hits them alike. The timer is the process's CPU time, which leaves out time spent
waiting for a core. The figures are the median and the minimum over rounds, in microseconds
per text. Before timing, the script checks that every variant returns the same values.

    python -m bench.sentiment [--csv FILE] [--rounds N]
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import statistics
import time
import timeit
from collections.abc import Callable
from pathlib import Path

from textblob.en import sentiment as textblob_sentiment

from chatmw import sentiment
from chatmw._pattern_polarity import pattern_polarity

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "tests" / "fixtures" / "sentiment" / "chat_texts.json"

# chatmw's English test before it was sped up, for the "previous" variants.
_MARKUP = re.compile(r"(?:https?://|www\.)\S+|\S+@\S+\.\S+|[@#]\w+")
_WORD = re.compile(r"[^\W\d_]+(?:'[^\W\d_]+)?")


def previous_is_english(text: str) -> bool:
    words = [m.group(0).lower() for m in _WORD.finditer(_MARKUP.sub(" ", text.replace("’", "'")))]
    if not words:
        return False
    core_words, known_words = sentiment._vocabularies()
    core = sum(1 for word in words if word in core_words)
    known = sum(1 for word in words if word in known_words)
    share = len(words)
    return known / share >= sentiment.MIN_KNOWN_SHARE and core / share >= sentiment.MIN_CORE_SHARE


def previous_polarity(text: str | None) -> float | None:
    if not text or not previous_is_english(text):
        return None
    return max(-1.0, min(1.0, round(float(textblob_sentiment(text)[0]), 4)))


def uncached_polarity(text: str | None) -> float | None:
    return sentiment._score(text) if text else None


def load_texts(csv_path: Path | None) -> list[str]:
    if csv_path is None:
        return json.loads(CORPUS.read_text("utf-8"))
    with csv_path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    return [row["text"] for row in rows if row.get("role", "user") == "user"]


VARIANTS: dict[str, Callable[[str], object]] = {
    "TextBlob sentiment call": lambda text: textblob_sentiment(text)[0],
    "pattern_polarity": pattern_polarity,
    "is_english, previous": previous_is_english,
    "is_english": sentiment.is_english,
    "polarity, previous": previous_polarity,
    "polarity, memo off": uncached_polarity,
    "polarity, memo warm": sentiment.polarity,
}


def check(texts: list[str]) -> None:
    """Raise AssertionError when a fast variant disagrees with its previous version."""
    for text in texts:
        assert pattern_polarity(text) == textblob_sentiment(text)[0], text
        assert sentiment.is_english(text) is previous_is_english(text), text
        assert uncached_polarity(text) == previous_polarity(text), text
        assert sentiment.polarity(text) == previous_polarity(text), text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--csv", type=Path, help="CSV file with a text column")
    parser.add_argument("--rounds", type=int, default=7, help="timing rounds (default 7)")
    args = parser.parse_args(argv)

    texts = load_texts(args.csv)
    check(texts)  # also loads the lexicons and fills the memo
    timings: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for _ in range(args.rounds):
        for name, function in VARIANTS.items():
            seconds = timeit.timeit(
                lambda f=function: [f(text) for text in texts], timer=time.process_time, number=1
            )
            timings[name].append(seconds / len(texts) * 1e6)

    print(f"{len(texts)} texts, {args.rounds} rounds, microseconds per text: median, min")
    for name, values in timings.items():
        print(f"  {name:<26} {statistics.median(values):8.2f} {min(values):8.2f}")


if __name__ == "__main__":
    main()
