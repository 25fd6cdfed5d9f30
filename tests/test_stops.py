"""StopMatcher, find_banned and held_suffix_len against brute-force references written here."""

import random

import pytest

from tokenmill.engine.stops import StopMatcher, find_banned, held_suffix_len


def stream(stops, chunks):
    """Feed chunks; return (released text, matched stop), flushing when no stop came."""
    m = StopMatcher(stops)
    out = []
    for c in chunks:
        text, hit = m.feed(c)
        out.append(text)
        if hit is not None:
            return "".join(out), hit
    return "".join(out) + m.flush(), None


def reference(stops, text):
    """The stop that is complete first while reading text left to right (the longer on a tie) and the text before it."""
    for end in range(1, len(text) + 1):
        done = [s for s in stops if text[:end].endswith(s)]
        if done:
            s = max(done, key=len)
            return text[: end - len(s)], s
    return text, None


def test_stop_split_across_many_feeds():
    assert stream(["<|end|>"], ["Hello", " wor", "ld<", "|e", "nd", "|>", "tail"]) == ("Hello world", "<|end|>")


def test_partial_match_is_released_when_it_fails():
    m = StopMatcher(["STOP"])
    assert m.feed("abc ST") == ("abc ", None)
    assert m.feed("O") == ("", None)
    assert m.feed("P!") == ("", "STOP")
    m = StopMatcher(["STOP"])
    assert m.feed("xST") == ("x", None)
    assert m.feed("OW") == ("STOW", None)
    assert m.flush() == ""


def test_held_text_comes_back_on_flush():
    m = StopMatcher(["###"])
    assert m.feed("answer #") == ("answer ", None)
    assert m.feed("#") == ("", None)
    assert m.flush() == "##"


def test_multiple_stop_strings_first_completed_wins():
    assert stream(["abc", "b"], ["abc"]) == ("a", "b")
    assert stream(["\n\n", "User:"], ["Sure.", "\nUs", "er:", " hi"]) == ("Sure.\n", "User:")
    assert stream(["cd", "abcde"], ["ab", "cde"]) == ("ab", "cd")


def test_stop_at_the_very_start():
    assert stream(["</s>"], ["</s>after"]) == ("", "</s>")
    assert stream(["</s>"], ["<", "/", "s", ">"]) == ("", "</s>")


def test_nothing_after_a_stop_is_released():
    m = StopMatcher(["X"])
    assert m.feed("aXb") == ("a", "X")
    assert m.feed("more") == ("", None)
    assert m.flush() == ""


def test_no_stops_releases_everything():
    assert stream([], ["a", "b"]) == ("ab", None)


@pytest.mark.parametrize("seed", range(40))
def test_random_chunkings_match_the_reference(seed):
    rng = random.Random(seed)
    alphabet = "abc"
    stops = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 3))]
    text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
    cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randint(0, 8))))
    chunks = [text[i:j] for i, j in zip([0] + cuts, cuts + [len(text)])]
    assert stream(stops, chunks) == reference(stops, text), (stops, chunks)
    assert stream(stops, list(text)) == reference(stops, text)


def test_find_banned_earliest_then_longest():
    assert find_banned("the cat sat", ["sat", "cat"]) == (4, "cat")
    assert find_banned("foobar", ["foo", "foobar", "bar"]) == (0, "foobar")
    assert find_banned("Cat", ["cat"]) is None  # case-sensitive
    assert find_banned("anything", []) is None


def test_held_suffix_len_vs_brute_force():
    rng = random.Random(0)
    for _ in range(300):
        strings = ["".join(rng.choice("xy") for _ in range(rng.randint(1, 5))) for _ in range(rng.randint(1, 3))]
        text = "".join(rng.choice("xy") for _ in range(rng.randint(0, 8)))
        want = max((k for s in strings for k in range(1, len(s)) if k <= len(text) and text.endswith(s[:k])),
                   default=0)
        assert held_suffix_len(text, strings) == want
    assert held_suffix_len("I hate sp", ["spam"]) == 2
    assert held_suffix_len("spam", ["spam"]) == 0  # complete: find_banned's job, not a prefix to wait on
