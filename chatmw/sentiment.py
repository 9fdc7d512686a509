"""Sentiment of user messages: TextBlob polarity, stored by a writer enricher.

The enricher runs in the recorder's writer thread, never on the request path. It scores
only user messages of kind ``message`` with text, and only text that looks English:
TextBlob's default analyser (``PatternAnalyzer``, whose lexicon ships inside the textblob
package, so no corpus download is needed) scores English words only and returns 0.0 for
anything else. Scoring French or an emoji as 0.0 would count it as neutral, so such text
is stored as unscored (``NULL``) instead.

The score is TextBlob's polarity rounded to 4 decimals. ``chatmw._pattern_polarity``
computes it with plain string operations and dict lookups instead of TextBlob's tokenizer,
and hands text with unusual whitespace to TextBlob itself. Texts of up to
:data:`_MEMO_MAX_CHARS` characters are remembered (the last :data:`_MEMO_SIZE` of them),
because chat users repeat short texts such as greetings and button titles.

The English test: handles (``@name``), hashtags, links and e-mail addresses are removed,
and the remaining words (runs of letters in any script, apostrophes kept) are looked up in
TextBlob's English word list and sentiment lexicon and in :data:`ENGLISH_WORDS`, a list of
English function and chat words. The shares that make a text English are
:data:`MIN_KNOWN_SHARE` and :data:`MIN_CORE_SHARE`. Text without letters (emoji,
emoticons, numbers) is unscored.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from typing import Any

from chatmw import events as ev
from chatmw._pattern_polarity import pattern_polarity
from chatmw._textblob_parts import SENTIMENT as _pattern_lexicon
from chatmw._textblob_parts import english_file

__all__ = [
    "ENGLISH_WORDS",
    "MIN_KNOWN_SHARE",
    "MIN_CORE_SHARE",
    "is_english",
    "polarity",
    "sentiment_enricher",
]

# A text is scored when at least MIN_KNOWN_SHARE of its words are English words (in
# TextBlob's English word list, its sentiment lexicon or ENGLISH_WORDS) and at least
# MIN_CORE_SHARE are core English words (in the sentiment lexicon or ENGLISH_WORDS). The word
# list alone is not enough because it comes from Project Gutenberg books and so contains
# French and German words such as "merci" and "ist".
MIN_KNOWN_SHARE = 0.6
MIN_CORE_SHARE = 0.25

# English function words (pronouns, articles, auxiliaries, prepositions, conjunctions,
# question words) and frequent support-chat words that the sentiment lexicon lacks.
_ENGLISH_WORDS_TEXT = """
a about above after again against all also am an and any are aren't as at be because been
before being below between both but by can can't cannot could couldn't did didn't do does
doesn't doing don't down during each few for from further had hadn't has hasn't have
haven't having he he'd he'll he's her here here's hers herself him himself his how how's i
i'd i'll i'm i've if in into is isn't it it's its itself just let's me more most mustn't my
myself no nor not now of off on once only or other ought our ours ourselves out over own
please same shan't she she'd she'll she's should shouldn't so some such than that that's
the their theirs them themselves then there there's these they they'd they'll they're
they've this those through to too under until up us very was wasn't we we'd we'll we're
we've were weren't what what's when when's where where's which while who who's whom why
why's will with won't would wouldn't yes yet you you'd you'll you're you've your yours
yourself yourselves
hi hello hey thanks thank thx pls plz ok okay yeah yep nope lol order orders account help
need want get got know like money refund pay paid payment card delivery package price still
sorry anyone agent human person talk speak someone call phone email password login log sign
app issue issues problem problems fix working work works customer service support time
bot bots chatbot
"""
ENGLISH_WORDS = frozenset(_ENGLISH_WORDS_TEXT.split())

# Handles, hashtags, links and e-mail addresses are names, not words of any language.
_MARKUP = re.compile(r"(?:https?://|www\.)\S+|\S+@\S+\.\S+|[@#]\w+")
# Every _MARKUP match contains one of these and no whitespace, so only the whitespace-separated
# runs that contain one need the substitution.
_MARKUP_SIGNS = ("@", "#", "://", "www.")
_WORD = re.compile(r"[^\W\d_]+(?:'[^\W\d_]+)?")
# On lowercase ASCII text, _WORD matches runs of a-z, joined by one apostrophe at most.
_ASCII_WORD = re.compile(r"[a-z]+(?:'[a-z]+)?")
# A bytes.translate table that lowercases ASCII letters and turns every other byte into a
# space. A bytes table needs no dict lookup per character, unlike str.translate.
_ASCII_LOWER_LETTERS = bytes(
    code if chr(code).isascii() and chr(code).isalpha() else 32
    for code in range(256)
).lower()

# Scores of up to _MEMO_SIZE texts of at most _MEMO_MAX_CHARS characters are kept. Full, that
# is about 9 MB for ASCII texts (260 bytes per entry with its key, tracemalloc, CPython 3.11)
# and up to about 22 MB for texts with emoji, which take 4 bytes per character.
_MEMO_SIZE = 32_768
_MEMO_MAX_CHARS = 128


@functools.cache
def _vocabularies() -> tuple[frozenset[str], frozenset[str]]:
    """Return the core English words and all known English words, built on first use."""
    # en-spelling.txt ships with textblob (about 29,000 words with their counts, after
    # comment lines starting with ";;;"); it is read once, in the thread that scores first.
    path = english_file("en-spelling.txt")
    listed = set()
    for line in path.read_text("utf-8").splitlines():
        if line and not line.startswith(";;;"):
            listed.add(line.split()[0].lower())
    core = ENGLISH_WORDS | {word for word in _pattern_lexicon if " " not in word}
    return frozenset(core), frozenset(core | listed)


def _without_markup(text: str) -> str:
    runs = text.split()
    for index, run in enumerate(runs):
        if "@" in run or "#" in run or "://" in run or "www." in run:  # _MARKUP_SIGNS
            runs[index] = _MARKUP.sub(" ", run)
    return " ".join(runs)


def _words(text: str) -> list[str]:
    if text.isascii():
        if "@" in text or "#" in text or "://" in text or "www." in text:  # _MARKUP_SIGNS
            text = _without_markup(text)
    else:
        text = text.replace("\u2019", "'")
        if any(sign in text for sign in _MARKUP_SIGNS):
            text = _without_markup(text)
        if not text.isascii():
            return [word.lower() for word in _WORD.findall(text)]
    # Lowercasing ASCII maps letters to letters only, so the words stay the same.
    if "'" in text:
        return _ASCII_WORD.findall(text.lower())
    return text.encode("ascii").translate(_ASCII_LOWER_LETTERS).decode("ascii").split()


def is_english(text: str) -> bool:
    """Return whether ``text`` looks English by the share of known English words in it."""
    words = _words(text)
    if not words:
        return False
    core_words, known_words = _vocabularies()
    core = sum(map(core_words.__contains__, words))
    known = sum(map(known_words.__contains__, words))
    return known / len(words) >= MIN_KNOWN_SHARE and core / len(words) >= MIN_CORE_SHARE


def _score(text: str) -> float | None:
    if not is_english(text):
        return None
    # pattern_polarity returns textblob.en.sentiment(text)[0], which is the polarity that
    # TextBlob's PatternAnalyzer.analyze returns.
    return max(-1.0, min(1.0, round(pattern_polarity(text), 4)))


_remembered_score = functools.lru_cache(maxsize=_MEMO_SIZE)(_score)


def polarity(text: str | None) -> float | None:
    """Return the TextBlob polarity of ``text`` in [-1, 1], or ``None`` when it is not scored."""
    if not text:
        return None
    if len(text) <= _MEMO_MAX_CHARS:
        return _remembered_score(text)
    return _score(text)


def sentiment_enricher(message: ev.Message) -> Mapping[str, Any]:
    """Return the ``sentiment`` column of a user message; other messages are left unchanged."""
    if message.role != "user" or message.kind != "message":
        return {}
    return {"sentiment": polarity(message.text)}
