"""VQAv2's accuracy against cases worked out by hand from the released evaluation's rules (lmeye_fast.vqa):
each row says which rule decides it; the rows marked "was" are ones the earlier partial tables got wrong."""

import pytest

from lmeye_fast.eval import exact_match, normalize_answer, vqa_accuracy
from lmeye_fast.vqa import CONTRACTIONS, strip_punctuation

NORMALISED = [
    # case and white space
    ("Yes", "yes"), ("  many   spaces ", "many spaces"), ("it's\nred", "it's red"), ("left\tside", "left side"),
    # punctuation next to a space is deleted, elsewhere it becomes a space
    ("red, white", "red white"), ("red,white", "red white"), ("red-and-white!", "red and white"),
    ("t - shirt", "t shirt"), ("yes ?", "yes"), ("What?", "what"), ("(yes)", "yes"), ("dog/cat", "dog cat"),
    ("10/10", "10 10"),
    # a comma between digits anywhere: every mark is deleted
    ("100,978", "100978"), ("1,000-2", "10002"), ("1,000 (approx)", "1000 approx"),
    # marks the evaluation keeps (was: deleted)
    ("$5", "$5"), ("50%", "50%"), ("#1", "#1"), ("a&w", "a&w"), ("5*3", "5*3"), ("2:50 pm", "2:50 pm"),
    ("girl's", "girl's"),
    # periods: deleted unless a digit follows
    ("yes.", "yes"), ("5.", "5"), ("3.5", "3.5"), (".5", ".5"), ("a.m.", "am"), ("e.g.", "eg"),
    ("." * 40, "." * 8),  # only the first 32 periods go
    # numbers and articles
    ("Two", "2"), ("ten cats", "10 cats"), ("none", "0"), ("the one", "1"), ("The dog", "dog"),
    ("a red and an apple", "red and apple"), ("a", ""), ("eleven", "eleven"),
    # contractions, the table's entries only
    ("dont know", "don't know"), ("isnt", "isn't"), ("hed", "he'd"), ("oclock", "o'clock"), ("twas", "'twas"),
    ("couldn'tve", "couldn't've"), ("somebody'd", "somebodyd"), ("maam", "ma'am"), ("its", "its"),
    ("im", "im"), ("ive", "ive"), ("shed", "shed"),  # was: i'm, i've, she'd
]


@pytest.mark.parametrize("raw, normalised", NORMALISED)
def test_normalisation_of_a_prediction(raw, normalised):
    assert normalize_answer(raw) == normalised


def test_the_contraction_table_is_whole():
    assert len(CONTRACTIONS) == 114  # the released table's 120 entries less the 6 that never apply
    assert all(word == word.lower() and "'" in form for word, form in CONTRACTIONS.items()
               if word != "somebody'd")


def digits(hits, total=10):
    return ["2"] * hits + ["3"] * (total - hits)


ACCURACY = [
    # min(#others who said it / 3, 1), averaged over the annotators left out in turn
    ("2", digits(0), 0.0), ("2", digits(1), 0.3), ("2", digits(2), 0.6), ("2", digits(3), 0.9),
    ("2", digits(4), 1.0), ("two", digits(3), 0.9),
    ("yes.", ["yes"] * 10, 1.0),
    # the annotators' answers are not normalised beyond punctuation (was: 1.0)
    ("2", ["two"] * 10, 0.0), ("two", ["two"] * 4 + ["2"] * 6, 1.0),
    # ... and not even that when they all agree (was: 1.0)
    ("t-shirt", ["t-shirt"] * 10, 0.0), ("t-shirt", ["t-shirt"] * 9 + ["shirt"], 1.0),
    ("t shirt", ["t-shirt"] * 2 + ["shirt"] * 8, 0.6),
    # a single reference answer: no set of all but one, so the one answer scores a third
    ("yes", ["yes"], 1 / 3), ("no", ["yes"], 0.0),
]


@pytest.mark.parametrize("prediction, answers, accuracy", ACCURACY)
def test_accuracy_over_the_leave_one_out_sets(prediction, answers, accuracy):
    assert vqa_accuracy(prediction, answers) == pytest.approx(accuracy)


def test_exact_match_normalises_both_sides():
    assert exact_match("The Two", ["2", "three"]) == 1.0 and exact_match("four", ["2"]) == 0.0
    assert exact_match("2", ["two"]) == 1.0


def test_bad_answers_are_refused_by_name():
    with pytest.raises(ValueError, match="answers: expected a non-empty list"):
        vqa_accuracy("yes", [])
    with pytest.raises(ValueError, match="answers: expected a non-empty list"):
        vqa_accuracy("yes", "yes")
    with pytest.raises(TypeError, match=r"answers\[1\]: expected a string, got NoneType"):
        vqa_accuracy("yes", ["yes", None])
    with pytest.raises(TypeError, match="answer: expected a string, got int"):
        normalize_answer(2)
    with pytest.raises(TypeError, match="text: expected a string"):
        strip_punctuation(None)
