"""Sentiment scoring: the fast polarity against TextBlob's own call, on fixed and generated texts.

TextBlob is the reference. ``textblob.en.sentiment(text)[0]`` is the float chatmw stored before
the fast path existed, and ``reference_polarity`` below repeats how chatmw rounded it. The
fixture ``fixtures/sentiment/chat_texts.json`` contains chat-like texts written for this test:
negations, modifiers, "!", "(!)", emoticons, contractions, quotes, abbreviations, ellipses,
numbers, links, line breaks, non-English text and unusual whitespace.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from textblob import _text as textblob_text
from textblob.en import sentiment as textblob_sentiment

from chatmw import _pattern_polarity, _textblob_parts, sentiment
from chatmw._pattern_polarity import fast_pattern_polarity, pattern_polarity
from chatmw.sentiment import MIN_CORE_SHARE, MIN_KNOWN_SHARE, is_english, polarity

CORPUS = json.loads(
    (Path(__file__).parent / "fixtures" / "sentiment" / "chat_texts.json").read_text("utf-8")
)

# The word split and English test as chatmw wrote them before they were sped up.
REFERENCE_MARKUP = re.compile(r"(?:https?://|www\.)\S+|\S+@\S+\.\S+|[@#]\w+")
REFERENCE_WORD = re.compile(r"[^\W\d_]+(?:'[^\W\d_]+)?")


def reference_words(text: str) -> list[str]:
    text = REFERENCE_MARKUP.sub(" ", text.replace("\u2019", "'"))
    return [match.group(0).lower() for match in REFERENCE_WORD.finditer(text)]


def reference_is_english(text: str) -> bool:
    words = reference_words(text)
    if not words:
        return False
    core_words, known_words = sentiment._vocabularies()
    core = sum(1 for word in words if word in core_words)
    known = sum(1 for word in words if word in known_words)
    return known / len(words) >= MIN_KNOWN_SHARE and core / len(words) >= MIN_CORE_SHARE


def reference_polarity(text: str) -> float | None:
    if not text or not reference_is_english(text):
        return None
    score = float(textblob_sentiment(text)[0])
    return max(-1.0, min(1.0, round(score, 4)))


def textblob_words(text: str) -> list[str]:
    """Return the lowercase tokens that TextBlob's sentiment call assesses."""
    return [word.lower() for word in " ".join(textblob_sentiment.tokenizer(text)).split()]


def mismatches(texts: list[str]) -> list[tuple[str, float, float]]:
    """Return (text, TextBlob's polarity, fast polarity) for every text where they differ."""
    found = []
    for text in texts:
        expected = textblob_sentiment(text)[0]
        actual = pattern_polarity(text)
        if actual != expected:
            found.append((text, expected, actual))
    return found


# Pieces for generated texts: lexicon words with a polarity, adverbs that modify the next
# word, negations, punctuation, emoticons, quotes, contractions and abbreviations.
_LEXICON = dict(textblob_sentiment.items())
SCORED_WORDS = sorted(word for word, tags in _LEXICON.items() if " " not in word and tags[None][0])
MODIFIERS = sorted(word for word, tags in _LEXICON.items() if " " not in word and "RB" in tags)
EMOTICONS = sorted(face for faces in textblob_text.EMOTICONS.values() for face in faces)
OTHER_PIECES = [
    "not", "no", "never", "n't", "don't", "isn't", "wasn't", "can't", "won't", "I'm", "it's",
    "you're", "we've", "I'd", "I'll", "really", "very", "so", "a", "the", "is", "it", "I",
    "my", "order", "help", "refund", "hi", "thanks", "ok", "x", "o", "O", "D", "8", "3",
    "!", "!!!", "?", "?!", "...", "....", ".", ",", ";", ":", "-", "(", ")", "(!)", "( ! )",
    "'", '"', "\u201c", "\u201d", "\u2018", "\u2019", "e.g.", "i.e.", "U.S.", "Mr.", "etc.",
    "A.", "b.", "M|r.", "w/", "END-OF-SENTENCE", "42", "3.50", "#tag", "@name",
    "https://example.com/a.b", "café", "😀", "\u00a0",
]  # fmt: skip
SEPARATORS = [" ", " ", " ", " ", "", "  ", "\n", "\n\n", "\r\n", "\t", " . ", " ! "]
SUFFIXES = ["!", ".", "?", ",", ")", "...", ":)", "'s", "n't", "'", "\u2019"]
PREFIXES = ["(", '"', "'", "\u201c", "\u2018", "*"]


def generated_texts(count: int, seed: int) -> list[str]:
    """Return ``count`` texts built from lexicon words, modifiers, negations and punctuation."""
    rng = random.Random(seed)
    texts = []
    for _ in range(count):
        parts = []
        for _ in range(rng.randint(0, 12)):
            draw = rng.random()
            if draw < 0.3:
                piece = rng.choice(SCORED_WORDS)
            elif draw < 0.45:
                piece = rng.choice(MODIFIERS)
            elif draw < 0.6:
                piece = rng.choice(EMOTICONS)
            else:
                piece = rng.choice(OTHER_PIECES)
            case = rng.random()
            if case < 0.1:
                piece = piece.upper()
            elif case < 0.25:
                piece = piece.capitalize()
            if rng.random() < 0.2:
                piece += rng.choice(SUFFIXES)
            if rng.random() < 0.1:
                piece = rng.choice(PREFIXES) + piece
            parts.append(piece + rng.choice(SEPARATORS))
        texts.append("".join(parts))
    return texts


GENERATED = generated_texts(4000, seed=20240304)


def test_corpus_polarity_matches_textblob() -> None:
    assert len(CORPUS) >= 500
    assert mismatches(CORPUS) == []


def test_corpus_tokens_match_textblob() -> None:
    for text in CORPUS:
        assert _pattern_polarity._words(text) == textblob_words(text), text


def test_corpus_fast_path_scores_most() -> None:
    fast = [text for text in CORPUS if fast_pattern_polarity(text) is not None]
    assert len(fast) >= 0.95 * len(CORPUS)


def test_corpus_scores_are_not_all_zero() -> None:
    # Guards the corpus itself: equal zeros everywhere would prove little.
    scores = [textblob_sentiment(text)[0] for text in CORPUS]
    assert sum(1 for score in scores if score > 0) >= 100
    assert sum(1 for score in scores if score < 0) >= 100


@pytest.mark.parametrize("text", ["great\u00a0job", "bad\u3000service", "thanks\u2028great"])
def test_unusual_whitespace_falls_back(text: str) -> None:
    assert fast_pattern_polarity(text) is None
    assert pattern_polarity(text) == textblob_sentiment(text)[0]


def test_standalone_lexicon_matches_textblob() -> None:
    # chatmw builds the lexicon from textblob's files without importing the textblob package.
    standalone = _textblob_parts.SENTIMENT
    assert dict(standalone.items()) == _LEXICON
    assert len(_LEXICON) > 2800
    # The adverbs derived from adjectives are there, with the adjective's scores.
    assert standalone["terribly"]["RB"] == tuple(_LEXICON["terrible"]["JJ"])
    assert standalone["happily"]["RB"] == tuple(_LEXICON["happy"]["JJ"])
    assert tuple(standalone.negations) == tuple(textblob_sentiment.negations)
    assert tuple(standalone.modifiers) == tuple(textblob_sentiment.modifiers)
    for word in ("badly", "really", "bad", "ly", ""):
        assert standalone.modifier(word) == textblob_sentiment.modifier(word)
    assert _textblob_parts.TEXT.EMOTICONS == textblob_text.EMOTICONS


def test_standalone_scorer_matches_textblob() -> None:
    # The standalone object scores the texts the fast path leaves, with TextBlob's tokens.
    standalone = _textblob_parts.SENTIMENT
    texts = CORPUS + GENERATED[:500] + ["great\u00a0job!!", "not\u2028bad :)", "a\n\n\nb good"]
    for text in texts:
        assert standalone.tokenizer(text) == textblob_sentiment.tokenizer(text), text
        assert standalone(text) == textblob_sentiment(text), text


def test_generated_polarity_matches_textblob() -> None:
    assert mismatches(GENERATED) == []


def test_generated_tokens_match_textblob() -> None:
    for text in GENERATED:
        if fast_pattern_polarity(text) is not None:
            assert _pattern_polarity._words(text) == textblob_words(text), text


def test_printable_tokens_match_whole_text_tokens() -> None:
    # Run by run, from remembered runs on the second pass, as _tokens on the whole text.
    texts = [text for text in CORPUS + GENERATED if text.isascii() and text.isprintable()]
    assert len(texts) >= 1000
    _pattern_polarity._RUN_TOKENS.clear()
    for _ in range(2):
        for text in texts:
            assert _pattern_polarity._printable_tokens(text) == _pattern_polarity._tokens(text)
    assert 0 < len(_pattern_polarity._RUN_TOKENS) <= _pattern_polarity._RUN_TOKENS_SIZE


def test_generated_fast_path_scores_most() -> None:
    fast = [text for text in GENERATED if fast_pattern_polarity(text) is not None]
    assert len(fast) >= 0.9 * len(GENERATED)


def test_generated_texts_exercise_rules() -> None:
    # The generated texts must reach negation, modifier, "!" and emoticon rules.
    scores = [textblob_sentiment(text)[0] for text in GENERATED]
    assert len({round(score, 6) for score in scores}) >= 500
    assert sum(1 for text in GENERATED if ":)" in " ".join(textblob_words(text))) >= 50


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(SCORED_WORDS + MODIFIERS + EMOTICONS + OTHER_PIECES),
            st.sampled_from(SEPARATORS + SUFFIXES + PREFIXES),
        ),
        max_size=12,
    )
)
def test_polarity_matches_textblob_on_word_lists(parts: list[tuple[str, str]]) -> None:
    text = "".join(piece + separator for piece, separator in parts)
    assert pattern_polarity(text) == textblob_sentiment(text)[0]


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=40))
def test_polarity_matches_textblob_on_any_text(text: str) -> None:
    assert pattern_polarity(text) == textblob_sentiment(text)[0]


MARKUP_PIECES = [
    "@", "#", "://", "www.", "https://", "http", ".", "a", "Z", "é", "İ", "'", "\u2019", "_",
    "1", " ", "\n", "\u00a0", "-", "x@y.z", "don't",
]  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(MARKUP_PIECES), max_size=15))
def test_words_match_previous_split_on_markup(pieces: list[str]) -> None:
    text = "".join(pieces)
    assert sentiment._words(text) == reference_words(text)


def test_words_match_previous_split() -> None:
    for text in CORPUS + GENERATED:
        assert sentiment._words(text) == reference_words(text), text


def test_is_english_matches_previous_test() -> None:
    for text in CORPUS + GENERATED:
        assert is_english(text) is reference_is_english(text), text


def test_chatmw_polarity_matches_previous_score() -> None:
    for text in CORPUS + GENERATED + [None]:
        assert polarity(text) == reference_polarity(text), text


def test_repeated_text_is_remembered() -> None:
    text = "thanks, that was really helpful :)"
    first = polarity(text)
    hits = sentiment._remembered_score.cache_info().hits
    assert polarity(text) == first
    assert sentiment._remembered_score.cache_info().hits == hits + 1


def test_long_text_is_not_remembered() -> None:
    text = "the support was great and fast, " * 10
    assert len(text) > sentiment._MEMO_MAX_CHARS
    size = sentiment._remembered_score.cache_info().currsize
    assert polarity(text) == reference_polarity(text)
    assert sentiment._remembered_score.cache_info().currsize == size
