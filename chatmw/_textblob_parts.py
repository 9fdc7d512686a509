"""TextBlob's tokenizer tables and English sentiment lexicon, without the textblob package.

``import textblob`` runs the package's ``__init__``, which imports ``textblob.blob`` and
with it nltk: about 0.2-0.3 s of CPU in every process that scores text (the writer process,
``chatmw import``). Sentiment needs none of that. It needs ``textblob/_text.py``, which
imports only the standard library, and the lexicon ``textblob/en/en-sentiment.xml``.

This module loads ``_text.py`` from the installed textblob folder as a private module
(:data:`TEXT`), without running the package's ``__init__``. It then builds :data:`SENTIMENT`,
the English lexicon and scorer, with the settings of ``textblob.en.sentiment``. These are
the same negations, modifier tag and tokenizer, and the adverbs that ``textblob.en`` derives
from adjectives ("terrible" gives "terribly"). Like TextBlob's own object, ``SENTIMENT``
loads the XML file on first use. tests/test_sentiment_polarity.py checks that both objects
contain the same entries and score texts alike.
"""

from __future__ import annotations

import importlib.util
import sys
import threading
from pathlib import Path
from types import ModuleType
from typing import Any

__all__ = ["SENTIMENT", "TEXT", "english_file"]


def _textblob_folder() -> Path:
    # find_spec on a top-level name locates the package without importing it.
    spec = importlib.util.find_spec("textblob")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("textblob is not installed; chatmw needs it for sentiment: "
                          "pip install textblob")
    return Path(next(iter(spec.submodule_search_locations)))


def _load_text_module() -> ModuleType:
    name = "chatmw._textblob_text"
    loaded = sys.modules.get(name)
    if loaded is not None:
        return loaded
    spec = importlib.util.spec_from_file_location(name, _textblob_folder() / "_text.py")
    if spec is None or spec.loader is None:
        raise ImportError(f"failed to load {_textblob_folder() / '_text.py'}: no loader")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


TEXT = _load_text_module()


def english_file(name: str) -> Path:
    """Return the path of ``name`` in the installed ``textblob/en`` folder."""
    return _textblob_folder() / "en" / name


def _find_tokens(text: Any, **_options: Any) -> list[str]:
    # textblob.en's parser tokenizes with _text's defaults and two or more line feeds as
    # the end of a sentence.
    return TEXT.find_tokens(str(text), linebreak=r"\n{2,}")


class _EnglishSentiment(TEXT.Sentiment):  # type: ignore[misc, name-defined]
    """``_text.Sentiment`` plus the adverbs ``textblob.en`` adds when it loads the lexicon.

    The first use loads the lexicon under a lock. ``_text.lazydict`` loads whenever the dict
    is empty, so a second thread would score with the words loaded so far (the adverbs come
    last), and chatmw's lookup tables and memo would keep that partial result.
    """

    # Reentrant, because ``load`` itself adds the adverbs through ``annotate`` and so ``_lazy``.
    _load_lock = threading.RLock()
    _loading = False
    _loaded = False

    def _lazy(self, method: str, *args: Any) -> Any:
        if not self._loaded:
            with self._load_lock:
                if not self._loaded and not self._loading:
                    self._loading = True
                    try:
                        self.load()
                    finally:
                        self._loading = False
                    self._loaded = True
        return getattr(dict, method)(self, *args)

    def load(self, path: str | None = None) -> None:
        super().load(path)
        if path:
            return
        for word, by_tag in list(dict.items(self)):
            if "JJ" not in by_tag:
                continue
            stem = word[:-1] + "i" if word.endswith("y") else word
            if stem.endswith("le"):
                stem = stem[:-2]
            polarity, subjectivity, intensity = by_tag["JJ"]
            self.annotate(stem + "ly", "RB", polarity, subjectivity, intensity)


SENTIMENT = _EnglishSentiment(
    path=str(english_file("en-sentiment.xml")),
    synset="wordnet_id",
    negations=("no", "not", "n't", "never"),
    modifiers=("RB",),
    modifier=lambda word: word.endswith("ly"),
    tokenizer=_find_tokens,
    language="en",
)
