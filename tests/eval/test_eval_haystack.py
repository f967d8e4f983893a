import pytest

from kvcomp.eval.haystack import (FILLER, build_context, corpus_text, haystack_sentences, prose_sentences,
                                  split_sentences, take_sentences)


def test_split_sentences_basic_and_abbreviations():
    assert split_sentences("One two.  Three four!\nFive six? seven.") == ["One two.", "Three four!",
                                                                         "Five six? seven."]
    # "e.g." does not end a sentence; a quoted start does begin one
    assert split_sentences('Use a tuple, e.g. "x". "Y" follows.') == ['Use a tuple, e.g. "x".', '"Y" follows.']
    assert split_sentences("   ") == []
    with pytest.raises(ValueError, match="text"):
        split_sentences(3)


def test_noise_is_the_ruler_filler():
    sents = haystack_sentences("noise")
    assert sents == ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.",
                     "There and back again.")
    assert " ".join(sents) == FILLER
    assert take_sentences("noise", 7, 3) == list(sents[3:]) + list(sents)
    assert take_sentences("noise", 0) == []
    with pytest.raises(ValueError, match="offset"):
        take_sentences("noise", 3, 5)
    with pytest.raises(ValueError, match="haystack"):
        haystack_sentences("essay")


def test_prose_is_clean_deterministic_and_long():
    sents = prose_sentences()
    assert len(sents) > 1500
    assert sum(len(s) for s in sents) > 150_000  # tens of thousands of tokens of real English
    for s in sents:
        assert ">>>" not in s and "::=" not in s and "\n" not in s
        assert s[-1] in '.!?"”)\']' and len(s.split()) >= 4
    prose_sentences.cache_clear()
    assert prose_sentences() == sents
    # cycling past the end wraps to the beginning
    n = len(sents)
    assert take_sentences("prose", 3, n - 1) == [sents[-1], sents[0], sents[1]]
    assert corpus_text("prose").startswith(sents[0])


def test_build_context_inserts_at_sentence_boundaries():
    sents = [f"S{i}." for i in range(10)]
    ctx = build_context(sents, [(0.0, "A."), (50.0, "B."), (100.0, "C."), (50.0, "D."), (99.0, "E.")])
    assert ctx.split(" ") == ["A.", "S0.", "S1.", "S2.", "S3.", "S4.", "B.", "D.", "S5.", "S6.", "S7.",
                              "S8.", "E.", "S9.", "C."]
    assert build_context([], [(30.0, "X.")]) == "X."
    with pytest.raises(ValueError, match="depth"):
        build_context(sents, [(101.0, "X.")])
