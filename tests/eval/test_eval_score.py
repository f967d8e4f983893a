import pytest

from kvcomp.eval.score import postprocess, string_match_all, string_match_part


def test_string_match_all_hand_cases():
    assert string_match_all("The number is 1234567.", ["1234567"]) == 1.0
    assert string_match_all("The number is 1234576.", ["1234567"]) == 0.0
    assert string_match_all("It is 123 and 456", ["123", "789"]) == 0.5
    assert string_match_all("1111111, 2222222 and 3333333", ["1111111", "2222222", "3333333", "4444444"]) == 0.75
    # case-insensitive both ways
    assert string_match_all("they are: abcde, Fghij", ["ABCDE", "FGHIJ", "KLMNO"]) == pytest.approx(2 / 3)
    # substring semantics, exactly as RULER: a longer number containing the gold one counts
    assert string_match_all("12345678", ["1234567"]) == 1.0
    # a gold string split by a control character does not match; control chars become newlines
    assert string_match_all("12\x0034567", ["1234567"]) == 0.0
    assert string_match_all("", ["1"]) == 0.0
    # duplicates in the prediction do not count twice
    assert string_match_all("777 777 777", ["777", "888"]) == 0.5


def test_string_match_part_hand_cases():
    assert string_match_part("It is 123 and 456", ["123", "789"]) == 1.0
    assert string_match_part("nothing here", ["123", "789"]) == 0.0
    assert string_match_part("PARIS", ["paris", "london"]) == 1.0


def test_postprocess():
    assert postprocess("  a\tb\x01c \n") == "a\nb\nc"


def test_bad_answers():
    with pytest.raises(ValueError, match="answers"):
        string_match_all("x", [])
    with pytest.raises(ValueError, match="answers"):
        string_match_all("x", "123")
    with pytest.raises(ValueError, match="answers"):
        string_match_part("x", [""])
    with pytest.raises(ValueError, match="pred"):
        string_match_all(None, ["1"])
