"""Caption reading (encodings) and the per-step caption rules (lora_trainer.data.captions)."""
import random

import pytest

from lora_trainer.data.captions import build_caption, contains_word, missing_triggers, read_caption, split_tags, tag_frequency

T = ["ohwx"]


def test_missing_or_empty_caption_is_the_trigger_words():
    assert build_caption(None, ["ohwx", "other trigger"]) == "ohwx, other trigger"
    assert build_caption("", ["ohwx", "other trigger"]) == "ohwx, other trigger"
    assert build_caption("  \n ", T) == "ohwx"
    assert build_caption(None, T, prepend=False) == "ohwx"  # nothing else to train on


def test_prepend_only_when_absent():
    assert build_caption("a red circle", T) == "ohwx, a red circle"
    assert build_caption("OHWX, a red circle", T) == "OHWX, a red circle"  # case-insensitive: no duplicate
    assert build_caption("photo of ohwx on a beach", T) == "photo of ohwx on a beach"
    assert build_caption("ohwxy, a red circle", T) == "ohwx, ohwxy, a red circle"  # whole words only
    assert build_caption("a red circle", T, prepend=False) == "a red circle"
    # several triggers: only the missing one is added, in configured order
    assert build_caption("sks dog, grass", ["ohwx", "sks dog"]) == "ohwx, sks dog, grass"
    assert build_caption("SKS   dog, grass", ["sks dog"]) == "SKS dog, grass"  # whitespace-normalised


def test_tags_are_normalised():
    assert split_tags(" a ,, b  c\nd,\r\ne ") == ["a", "b c", "d", "e"]
    assert build_caption("a,b\nc", T, prepend=False) == "a, b, c"


def test_shuffle_keeps_leading_tags_and_is_deterministic():
    cap = "ohwx, t1, t2, t3, t4, t5, t6, t7"
    outs = {build_caption(cap, T, shuffle=True, keep_tokens=1, rng=random.Random(s)) for s in range(30)}
    assert len(outs) > 10
    for out in outs:
        tags = out.split(", ")
        assert tags[0] == "ohwx" and sorted(tags[1:]) == sorted(cap.split(", ")[1:])
    a = build_caption(cap, T, shuffle=True, keep_tokens=3, rng=random.Random(5))
    b = build_caption(cap, T, shuffle=True, keep_tokens=3, rng=random.Random(5))
    assert a == b and a.split(", ")[:3] == ["ohwx", "t1", "t2"]
    assert build_caption(cap, T, shuffle=False, rng=random.Random(5)) == cap


def test_prepended_triggers_count_as_first_tags():
    cap = "t1, t2, t3, t4, t5"
    for s in range(20):
        out = build_caption(cap, ["ohwx", "zz"], shuffle=True, keep_tokens=0, rng=random.Random(s)).split(", ")
        assert out[:2] == ["ohwx", "zz"]  # always kept in front, even with keep_tokens 0
    seen_first = {build_caption(cap, T, shuffle=True, keep_tokens=2, rng=random.Random(s)).split(", ")[1] for s in range(20)}
    assert seen_first == {"t1"}  # trigger + first caption tag kept
    # a trigger already in the caption is not moved: keep_tokens alone decides
    firsts = {build_caption("t1, ohwx, t2, t3", T, shuffle=True, keep_tokens=1, rng=random.Random(s)).split(", ")[0]
              for s in range(20)}
    assert firsts == {"t1"}


def test_dropout_rate_over_many_draws():
    rng = random.Random(0)
    n = 4000
    dropped = sum(build_caption("a, b", T, dropout_rate=0.3, rng=rng) == "" for _ in range(n))
    assert 0.27 < dropped / n < 0.33
    assert all(build_caption("a", T, dropout_rate=0.0, rng=rng) for _ in range(200))
    assert all(build_caption("a", T, dropout_rate=1.0, rng=rng) == "" for _ in range(50))
    # same seed, same decisions, shuffle included
    seq = lambda: [build_caption("a, b, c, d", T, dropout_rate=0.5, shuffle=True, rng=r) for r in [random.Random(9)] for _ in range(40)]
    assert seq() == seq()


def test_read_caption_encodings(tmp_path):
    p = tmp_path / "c.txt"
    p.write_bytes("\ufeffohwx, café".encode("utf-8"))
    assert read_caption(p) == ("ohwx, café", None)  # BOM dropped silently
    p.write_bytes("ohwx, naïve".encode("utf-8"))
    assert read_caption(p) == ("ohwx, naïve", None)
    p.write_bytes(b"ohwx, caf\xe9 \x93quoted\x94")  # cp1252 from an old Windows editor
    text, warn = read_caption(p)
    assert text == "ohwx, café \u201cquoted\u201d" and "cp1252" in warn and "UTF-8" in warn
    p.write_bytes(b"ohwx \x81 x\xe9")  # 0x81 is undefined in cp1252
    text, warn = read_caption(p)
    assert text.startswith("ohwx") and text.endswith("xé") and "latin-1" in warn
    p.write_bytes("ohwx, ünï".encode("utf-16"))
    text, warn = read_caption(p)
    assert text == "ohwx, ünï" and "UTF-16" in warn
    p.write_bytes(b"ohwx\x00, tag")
    text, warn = read_caption(p)
    assert text == "ohwx, tag" and "NUL" in warn
    with pytest.raises(OSError):
        read_caption(tmp_path / "missing.txt")


def test_trigger_helpers():
    assert contains_word("A photo of OHWX.", "ohwx")
    assert not contains_word("ohwx_2 photo", "ohwx")
    assert missing_triggers("ohwx, a dog", ["ohwx", "sks"]) == ["sks"]
    assert missing_triggers(None, ["ohwx"]) == ["ohwx"]


def test_tag_frequency():
    freq = tag_frequency({"10_ohwx": ["ohwx, red, circle", "ohwx, blue,circle", None], "root": ["a photo"]})
    assert freq == {"10_ohwx": {"ohwx": 2, "red": 1, "circle": 2, "blue": 1}, "root": {"a photo": 1}}
