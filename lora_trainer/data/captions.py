"""Caption files and the caption each training step sees.

Captions come from hand-edited text files of every origin (Windows editors, tagger tools, scraped
metadata), so reading never raises on content: odd encodings are decoded best-effort and reported
as a warning that names the file, and the trainer goes on.

A caption is treated as comma-separated tags. For natural-language captions without commas this is
one tag and the text passes through unchanged except for whitespace normalisation.
"""
from __future__ import annotations

import random
import re
from collections import Counter
from pathlib import Path
from typing import Iterable, Mapping, Sequence

_WS = re.compile(r"\s+")


def read_caption(path: str | Path) -> tuple[str, str | None]:
    """(text, warning or None). Raises OSError only if the file cannot be read at all."""
    data = Path(path).read_bytes()
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        # Notepad's "Unicode": a valid encoding, but the only one here that is not ASCII-compatible.
        try:
            return data.decode("utf-16"), "caption is UTF-16; decoded, but UTF-8 is recommended"
        except UnicodeDecodeError:
            pass
    try:
        text = data.decode("utf-8-sig")  # a BOM is normal from Windows editors: no warning
    except UnicodeDecodeError as exc:
        warning = f"caption is not valid UTF-8 (byte 0x{data[exc.start]:02x} at offset {exc.start})"
        try:
            # cp1252 first: it is what non-UTF-8 Western text almost always is, and it has the
            # curly quotes/dashes where latin-1 has invisible C1 controls.
            text = data.decode("cp1252")
            warning += "; decoded as cp1252"
        except UnicodeDecodeError:
            text = data.decode("latin-1")  # maps every byte: cannot fail
            warning += "; decoded as latin-1"
        return _strip_controls(text), warning
    if "\x00" in text:
        return _strip_controls(text), "caption contains NUL bytes (binary file?); they were removed"
    return text, None


def _strip_controls(text: str) -> str:
    return "".join(ch for ch in text if ch in "\t\n\r" or ord(ch) >= 32)


def split_tags(caption: str | None) -> list[str]:
    """Comma-separated tags, whitespace-normalised, empty ones dropped. Newlines separate tags too."""
    if not caption:
        return []
    tags = []
    for part in caption.replace("\r", "\n").replace("\n", ",").split(","):
        tag = _WS.sub(" ", part).strip()
        if tag:
            tags.append(tag)
    return tags


def _word_pattern(word: str) -> re.Pattern:
    # Whole-word, case-insensitive; inner whitespace of a multi-word trigger may vary.
    body = r"\s+".join(re.escape(w) for w in word.split())
    return re.compile(r"(?<!\w)" + body + r"(?!\w)", re.IGNORECASE)


_pattern_cache: dict[str, re.Pattern] = {}


def contains_word(text: str, word: str) -> bool:
    """True if `word` occurs in `text` as a whole word (case-insensitive): 'ohwx' is not found in 'ohwxy'."""
    pat = _pattern_cache.get(word)
    if pat is None:
        pat = _pattern_cache[word] = _word_pattern(word)
    return pat.search(text) is not None


def missing_triggers(caption: str | None, trigger_words: Sequence[str]) -> list[str]:
    """Trigger words not present in the caption (all of them for a missing caption)."""
    text = caption or ""
    return [t for t in trigger_words if t.strip() and not contains_word(text, t)]


def build_caption(raw: str | None, trigger_words: Sequence[str], *, prepend: bool = True, shuffle: bool = False,
                  keep_tokens: int = 1, dropout_rate: float = 0.0, rng: random.Random | None = None) -> str:
    """The caption for one training step.

    Order of operations, and of draws from ``rng`` (so a seeded rng reproduces a run exactly):
    1. dropout: one ``rng.random()`` draw when dropout_rate > 0; below the rate the result is ""
       (the unconditional caption; the trigger words are dropped too, as in kohya's caption dropout);
    2. a missing/empty caption becomes the trigger words alone, whatever ``prepend`` says;
    3. with ``prepend``, trigger words not already in the caption (whole-word, case-insensitive)
       are put in front, in the configured order;
    4. with ``shuffle``, the tags after the first ``keep_tokens`` are shuffled (one ``rng.shuffle``).
       Prepended trigger words count as the first tags and always stay in place, so the effective
       number kept is max(keep_tokens, number prepended).
    """
    # A fresh Random only when one is drawn from: seeding one costs 9 us, a tenth of the start-up caption pass.
    r = rng if rng is not None else (random.Random() if dropout_rate > 0 or shuffle else None)
    if dropout_rate > 0 and r.random() < dropout_rate:
        return ""
    triggers = [_WS.sub(" ", t).strip() for t in trigger_words if t and t.strip()]
    tags = split_tags(raw)
    prepended = 0
    if not tags:
        tags = list(triggers)
        prepended = len(tags)
    elif prepend:
        text = ", ".join(tags)
        front = [t for t in triggers if not contains_word(text, t)]
        tags = front + tags
        prepended = len(front)
    if shuffle and len(tags) > 1:
        keep = max(keep_tokens, prepended, 0)
        head, tail = tags[:keep], tags[keep:]
        r.shuffle(tail)
        tags = head + tail
    return ", ".join(tags)


def tag_frequency(captions_by_folder: Mapping[str, Iterable[str | None]]) -> dict[str, dict[str, int]]:
    """{folder: {tag: count}} over the captions as written (before trigger prepending), for kohya's
    ``ss_tag_frequency`` metadata. Missing captions are skipped."""
    out: dict[str, dict[str, int]] = {}
    for folder, captions in captions_by_folder.items():
        counts: Counter = Counter()
        for caption in captions:
            counts.update(split_tags(caption))
        out[folder] = dict(counts)
    return out


def prompts_for(cfg) -> list[str]:
    """The sample prompts of a run: validation_prompts, else the trigger words (the text cache encodes them too)."""
    return list(cfg.validation_prompts) or [", ".join(cfg.trigger_words)]
