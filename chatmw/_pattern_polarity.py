"""TextBlob's PatternAnalyzer polarity, computed without TextBlob's regex-heavy tokenizer.

``textblob.en.sentiment(text)`` (textblob 0.20) splits ``text`` into sentences of tokens with
``textblob._text.find_tokens`` and lowercases the tokens. It turns them into assessments: a
lexicon word with the adverb or negation before it, an emoticon, or the irony mark "(!)".
It returns the mean polarity of the assessments. :func:`pattern_polarity` returns the same
float (tests compare the two on a fixed corpus and on generated texts), computed as follows:

* Tokens come from ``str.replace`` and ``str.split``. Contractions ("n't" becomes " n't") and
  quote characters are padded with spaces, and two or more line feeds become TextBlob's
  end-of-sentence token. Only tokens that start or end with punctuation are split further:
  abbreviations such as "e.g." and "U.S." keep their period, and "..." is one token.
* TextBlob then rejoins spaced emoticons (": )" becomes ":)") and the irony mark "( ! )"
  within each sentence, with its regular expressions ``RE_EMOTICONS`` and ``RE_SARCASM``.
  Those run here too, with the same sentence split, but only when the tokens contain "(" and
  "!" or two emoticon characters separated by a space. Otherwise they cannot change anything.
* The lexicon is read once into a dict of (polarity, intensity, is adverb) per word, so each
  token costs one dict lookup instead of TextBlob's lookups through its lazy dict.

Text with whitespace other than space, tab, line feed and carriage return (a no-break space,
a line separator) is rare in chat and is scored by TextBlob itself. That keeps the fast path
independent of whether ``str.split`` and the ``\\s`` of ``re`` agree on Unicode whitespace
(they do in CPython 3.11).
"""

from __future__ import annotations

import functools
import re
from typing import NamedTuple

from chatmw._textblob_parts import SENTIMENT as textblob_sentiment
from chatmw._textblob_parts import TEXT as textblob_text

__all__ = ["fast_pattern_polarity", "pattern_polarity"]

_EOS = textblob_text.EOS
_CONTRACTIONS = tuple(textblob_text.replacements.items())
# Every contraction key contains an apostrophe in textblob 0.20, so text without one skips
# them all. The flag keeps the replacements exact if a textblob release adds another key.
_CONTRACTIONS_NEED_APOSTROPHE = all("'" in old for old, _ in _CONTRACTIONS)
_CONTRACTION_TOKENS = frozenset(textblob_text.replacements)
_QUOTES = ("\u201c", "\u201d", "\u2018", "\u2019", "'", '"')
_ASCII_QUOTES = tuple(quote for quote in _QUOTES if quote.isascii())
_LINE_BREAKS = re.compile(r"\n{2,}")

# A period is split off at a token's end only (and not after an abbreviation), so it is not
# in the set of characters split off at the start.
_LEADING_PUNCTUATION = frozenset(textblob_text.PUNCTUATION) - {"."}
_TRAILING_PUNCTUATION = _LEADING_PUNCTUATION | {"."}

# A sentence ends at one of _SENTENCE_ENDS and takes the closing tokens right after it. A
# straight quote always stops that run, because TextBlob checks whether the quote count is
# even in a sentence list that is still empty at that point.
_SENTENCE_ENDS = frozenset(("...", ".", "!", "?", _EOS))
_CLOSING_TOKENS = frozenset(("\u201d", "\u2019", "...", ".", "!", "?", ")", _EOS))

# Whitespace characters that send a text to TextBlob's own call.
_UNCHECKED_WHITESPACE = re.compile(r"[^\S \t\n\r]")


def _emoticon_pairs() -> re.Pattern[str]:
    """Compile a pattern for two adjacent emoticon characters with one space between them."""
    following: dict[str, set[str]] = {}
    for faces in textblob_text.EMOTICONS.values():
        for face in faces:
            for first, second in zip(face, face[1:], strict=False):
                following.setdefault(first, set()).add(second)
    # One branch per first character ("x [-D]") is about twice as fast as one per pair.
    branches = (
        re.escape(first) + " [" + "".join(re.escape(second) for second in sorted(seconds)) + "]"
        for first, seconds in sorted(following.items())
    )
    return re.compile("|".join(branches))


def _spaced_emoticons() -> re.Pattern[str]:
    """Compile RE_EMOTICONS restricted to matches with at least one space in the emoticon."""
    branches = []
    for faces in textblob_text.EMOTICONS.values():
        for face in faces:
            chars = [re.escape(char) for char in face]
            # The first space present follows chars[split - 1]; later spaces stay optional.
            for split in range(1, len(chars)):
                branches.append("".join(chars[:split]) + " " + " ?".join(chars[split:]))
    return re.compile(r"(?:%s)(?:$|\s)" % "|".join(branches))


# RE_EMOTICONS allows one optional space between the characters of an emoticon and replaces
# a match by the match without spaces, so it changes text only where this pattern matches.
_EMOTICON_PAIR = _emoticon_pairs()
# A sentence that RE_EMOTICONS changes has a match of this pattern, and so has the line of
# all sentences, where a space or the line's end follows each sentence. It runs only on
# lines that _EMOTICON_PAIR matches, because each of its matches contains such a pair.
_SPACED_EMOTICON = _spaced_emoticons()


class _Tables(NamedTuple):
    """Lexicon and token lookups built from TextBlob's loaded sentiment lexicon."""

    # Lowercase word -> (polarity, intensity, is a modifier such as an adverb).
    words: dict[str, tuple[float, float, bool]]
    negations: frozenset[str]
    # Token -> polarities of the assessments it appends (irony mark, emoticons).
    appended: dict[str, tuple[float, ...]]
    # Tokens outside the lexicon that change the assessments: negations, "!", appended.
    special: frozenset[str]


@functools.cache
def _tables() -> _Tables:
    """Build the lookups on first use, in the thread that scores first."""
    len(textblob_sentiment)  # loads en-sentiment.xml, as TextBlob's first call does
    words = {}
    for word, by_tag in dict.items(textblob_sentiment):
        if None in by_tag:
            score, _subjectivity, intensity = by_tag[None]
            is_modifier = any(tag in by_tag for tag in textblob_sentiment.modifiers)
            words[word] = (score, intensity, is_modifier)

    appended: dict[str, list[float]] = {"(!)": [0.0]}
    # TextBlob matches a lowercase token against each mood's emoticons, lowercased, in the
    # order of EMOTICONS, and only tokens that are not all letters, at most 5 characters long
    # and not a substring of PUNCTUATION.
    matched = set()
    for (_mood, score), faces in textblob_text.EMOTICONS.items():
        for face in {face.lower() for face in faces}:
            eligible = (
                not face.isalpha() and len(face) <= 5 and face not in textblob_text.PUNCTUATION
            )
            if eligible and face not in matched:
                matched.add(face)
                appended.setdefault(face, []).append(score)
    negations = frozenset(textblob_sentiment.negations)
    return _Tables(
        words=words,
        negations=negations,
        appended={token: tuple(scores) for token, scores in appended.items()},
        special=negations | {"!"} | appended.keys(),
    )


def _is_abbreviation(token: str) -> bool:
    if token in textblob_text.ABBREVIATIONS:
        return True
    # RE_ABBR1 and RE_ABBR2 ("a.", "U.S.") need a period second, RE_ABBR3 ("Mr.") a capital
    # A-Z first, so most words ending in a period skip the three patterns.
    if token[1:2] != "." and not "A" <= token[0] <= "Z":
        return False
    return (
        textblob_text.RE_ABBR1.match(token) is not None
        or textblob_text.RE_ABBR2.match(token) is not None
        or textblob_text.RE_ABBR3.match(token) is not None
    )


def _split_punctuation(token: str, tokens: list[str]) -> None:
    """Append ``token`` to ``tokens`` with its leading and trailing punctuation split off."""
    # Slices rather than indexes, because "" is in neither set and token may become "".
    while token[:1] in _LEADING_PUNCTUATION and token not in _CONTRACTION_TOKENS:
        tokens.append(token[0])
        token = token[1:]

    tail = []
    while token[-1:] in _TRAILING_PUNCTUATION and token not in _CONTRACTION_TOKENS:
        # One pass splits a punctuation mark, then an ellipsis, then a period, in that order.
        if token[-1:] in _LEADING_PUNCTUATION:
            tail.append(token[-1])
            token = token[:-1]
        if token.endswith("..."):
            tail.append("...")
            token = token[:-3].rstrip(".")
        if token.endswith("."):
            if _is_abbreviation(token):
                break
            tail.append(".")
            token = token[:-1]

    if token:
        tokens.append(token)
    tokens.extend(reversed(tail))


def _tokens(text: str) -> list[str]:
    """Return TextBlob's tokens of ``text``, end-of-sentence marks included."""
    if "'" in text or not _CONTRACTIONS_NEED_APOSTROPHE:
        for old, new in _CONTRACTIONS:
            if old in text:
                text = text.replace(old, new)
    for quote in _ASCII_QUOTES if text.isascii() else _QUOTES:
        if quote in text:
            text = text.replace(quote, f" {quote} ")
    if "\r\n" in text:
        text = text.replace("\r\n", "\n")
    if "\n\n" in text:
        text = _LINE_BREAKS.sub(f" {_EOS} ", text)

    tokens: list[str] = []
    append = tokens.append
    leading, trailing = _LEADING_PUNCTUATION, _TRAILING_PUNCTUATION
    for token in text.split():
        first, last = token[0], token[-1]
        if first not in leading and last not in trailing:
            append(token)
        elif last in leading and first not in leading and token[-2:-1] not in trailing:
            # One mark after a word ("order,") is the common case of _split_punctuation.
            append(token[:-1])
            append(last)
        else:
            _split_punctuation(token, tokens)
    return tokens


# The tokens of runs of printable ASCII text between spaces, remembered because chat texts
# repeat most of their words. Emptied once it contains _RUN_TOKENS_SIZE runs (about 2 MB).
_RUN_TOKENS: dict[str, tuple[str, ...]] = {}
_RUN_TOKENS_SIZE = 16_384


def _printable_tokens(text: str) -> list[str]:
    """Return ``_tokens(text)`` for printable ASCII ``text``, run by run.

    Such text has no line break, so no end-of-sentence mark, and the contractions and
    quotes that _tokens pads contain no space. So each run between spaces gives the same
    tokens on its own as within the text.
    """
    remembered = _RUN_TOKENS
    tokens: list[str] = []
    for run in text.split():
        found = remembered.get(run)
        if found is None:
            found = tuple(_tokens(run))
            if len(remembered) >= _RUN_TOKENS_SIZE:
                remembered.clear()
            remembered[run] = found
        tokens += found
    return tokens


def _sentences(tokens: list[str]) -> list[list[str]]:
    """Split tokens into sentences as TextBlob does, dropping end-of-sentence marks."""
    sentences = []
    start = index = 0
    while index < len(tokens):
        if tokens[index] in _SENTENCE_ENDS:
            while index < len(tokens) and tokens[index] in _CLOSING_TOKENS:
                index += 1
            sentences.append([token for token in tokens[start:index] if token != _EOS])
            start = index
        # Like TextBlob, this also steps over the token that stopped the closing run.
        index += 1
    sentences.append(tokens[start:])
    return [sentence for sentence in sentences if sentence]


def _join_marks(tokens: list[str]) -> list[str]:
    """Join spaced emoticons and irony marks per sentence with TextBlob's own patterns."""
    joined = []
    for sentence in _sentences(tokens):
        text = textblob_text.RE_SARCASM.sub("(!)", " ".join(sentence))
        text = textblob_text.RE_EMOTICONS.sub(
            lambda match: match.group(1).replace(" ", "") + match.group(2), text
        )
        joined.append(text)
    return " ".join(joined).split()


def _words(text: str) -> list[str]:
    """Return the lowercase words that TextBlob's sentiment call assesses for ``text``."""
    tokens = _printable_tokens(text) if text.isascii() and text.isprintable() else _tokens(text)
    assessed = [token for token in tokens if token != _EOS] if _EOS in tokens else tokens
    line = " ".join(assessed)
    # Each sentence is a part of the line, so RE_SARCASM and RE_EMOTICONS change no
    # sentence when these searches find nothing in the line (see _SPACED_EMOTICON).
    if (("(" in line and "!" in line and textblob_text.RE_SARCASM.search(line) is not None)
            or (_EMOTICON_PAIR.search(line) is not None
                and _SPACED_EMOTICON.search(line) is not None)):
        assessed = _join_marks(tokens)
    elif line.isascii():
        # ASCII lowercasing maps each character to one non-space character.
        return line.lower().split()
    return [token.lower() for token in assessed]


def _mean_polarity(words: list[str]) -> float:
    """Return the mean polarity of the assessments of ``words``, as TextBlob computes it."""
    tables = _tables()
    lexicon, negations, appended, special = (
        tables.words,
        tables.negations,
        tables.appended,
        tables.special,
    )
    # Each assessment is [polarity, intensity, negated]. A modifier or negation before a
    # lexicon word changes the last assessment instead of adding one.
    assessments: list[list] = []
    modifier: str | None = None
    negation: str | None = None
    for word in words:
        entry = lexicon.get(word)
        if entry is None and negation is None and modifier is None and word not in special:
            continue  # an unknown word with nothing to carry changes nothing
        if entry is not None:
            score, intensity, is_modifier = entry
            if modifier is None:
                last = [score, intensity, False]
                assessments.append(last)
            else:
                last = assessments[-1]
                last[0] = max(-1.0, min(score * last[1], 1.0))
                last[1] = intensity
            if negation is not None:
                last[1] = 1.0 / last[1]
                last[2] = True
            modifier = word if is_modifier else None
            negation = word if word in negations else None
            continue

        # Unknown words keep a negation only across one-letter words ("not a good") and a
        # modifier only across words of at most two characters ("really is a good").
        if word in negations:
            negation = word
        elif negation is not None and len(word.strip("'")) > 1:
            negation = None
        if negation is not None and modifier is not None and textblob_sentiment.modifier(modifier):
            assessments[-1][2] = True
            negation = None
        elif modifier is not None and len(word) > 2:
            modifier = None
        if word == "!" and assessments:
            last = assessments[-1]
            last[0] = max(-1.0, min(last[0] * 1.25, 1.0))
        for score in appended.get(word, ()):
            assessments.append([score, 1.0, False])

    # Same operations in the same order as TextBlob, so the float is identical.
    total = 0
    for score, _intensity, negated in assessments:
        total += score * -0.5 if negated else score
    return total / float(len(assessments) or 1)


def fast_pattern_polarity(text: str) -> float | None:
    """Return TextBlob's polarity of ``text``, or ``None`` for text left to TextBlob's call."""
    # Printable ASCII has no whitespace but the space, which saves the search.
    if not (text.isascii() and text.isprintable()) and _UNCHECKED_WHITESPACE.search(
            text) is not None:
        return None
    return _mean_polarity(_words(text))


def pattern_polarity(text: str) -> float:
    """Return ``float(textblob.en.sentiment(text)[0])``, TextBlob's polarity of ``text``."""
    score = fast_pattern_polarity(text)
    if score is None:
        return float(textblob_sentiment(text)[0])
    return score
