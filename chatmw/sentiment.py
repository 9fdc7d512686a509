"""Sentiment of user messages: TextBlob polarity, stored by a writer enricher.

The enricher runs in the recorder's writer thread, never on the request path. It scores
only user messages of kind ``message`` with text, and only text that looks English:
TextBlob's default analyser (``PatternAnalyzer``, whose lexicon ships inside the textblob
package, so no corpus download is needed) scores English words only and returns 0.0 for
anything else. Scoring French or an emoji as 0.0 would count it as neutral, so such text
is stored as unscored (``NULL``) instead.

The English test: the text's words (runs of letters in any script, apostrophes kept) are
looked up in TextBlob's sentiment lexicon and in :data:`ENGLISH_WORDS`, a short list of
English function and chat words. The text is English when it has at least one word and
at least :data:`MIN_ENGLISH_SHARE` of its words are found. Text without letters
(emoji, emoticons, numbers) is unscored.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from textblob.en import sentiment as _pattern_lexicon

from chatmw import events as ev

__all__ = [
    "ENGLISH_WORDS",
    "MIN_ENGLISH_SHARE",
    "is_english",
    "polarity",
    "sentiment_enricher",
]

# The share of words that must be known English words for a text to be scored.
MIN_ENGLISH_SHARE = 0.5

# English words frequent in chat that the sentiment lexicon lacks: pronouns, articles,
# auxiliaries, prepositions, question words and common support-chat words.
_ENGLISH_WORDS_TEXT = """
a about after again all also am an and any are as at be because been before being but by
can can't cannot could couldn't did didn't do does doesn't don't for from had has have
haven't he her here hers him his how i i'd i'll i'm i've if in into is isn't it it's its
just me my myself no nor not now of off on once only or our ours out over please same she
should so some such than that that's the their them then there these they this those
through to too under until up us was wasn't we were weren't what when where which while
who whom why will with won't would wouldn't yes you you're your yours yourself
hi hello hey thanks thank ok okay order orders account help need want get got know like
money refund pay paid payment card delivery package price still yet again sorry anyone
agent human person talk speak someone call phone email password login log sign
"""
ENGLISH_WORDS = frozenset(_ENGLISH_WORDS_TEXT.split())

_WORD = re.compile(r"[^\W\d_]+(?:'[^\W\d_]+)?")


def _words(text: str) -> list[str]:
    return [match.group(0).lower().replace("\u2019", "'") for match in _WORD.finditer(text)]


def is_english(text: str) -> bool:
    """Return whether ``text`` has words and at least half of them are known English words."""
    words = _words(text.replace("\u2019", "'"))
    if not words:
        return False
    known = sum(1 for word in words if word in ENGLISH_WORDS or word in _pattern_lexicon)
    return known / len(words) >= MIN_ENGLISH_SHARE


def polarity(text: str | None) -> float | None:
    """Return the TextBlob polarity of ``text`` in [-1, 1], or ``None`` when it is not scored."""
    if not text or not is_english(text):
        return None
    # The lexicon's own call is what PatternAnalyzer.analyze runs, without the namedtuple
    # class that analyze builds on every call (textblob 0.20: about 40 % of its time).
    score = float(_pattern_lexicon(text)[0])
    return max(-1.0, min(1.0, round(score, 4)))


def sentiment_enricher(message: ev.Message) -> Mapping[str, Any]:
    """Return the ``sentiment`` column of a user message; other messages are left unchanged."""
    if message.role != "user" or message.kind != "message":
        return {}
    return {"sentiment": polarity(message.text)}
