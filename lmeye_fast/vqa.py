"""VQAv2's accuracy as the released VQA evaluation computes it.

The rules, in the order they apply to a prediction:

1. newlines and tabs become spaces; leading and trailing spaces go;
2. punctuation (``PUNCTUATION``: not the apostrophe, colon, period, ``#$%&*^|~``):
   each mark is deleted when the text holds it next to a space, or when the
   text holds a comma between two digits anywhere; otherwise each occurrence
   becomes a space (``red-and-white`` -> ``red and white``, ``red, white`` ->
   ``red white``, ``100,978`` -> ``100978``);
3. periods: a period not followed by a digit is deleted (``5.`` -> ``5``,
   ``a.m.`` -> ``am``, ``3.5`` and ``.5`` stay), at most the first 32 of them,
   as the released code passes 32 (``re.UNICODE``) where the count goes;
4. words (split on white space, lower-cased): a number word from ``zero`` to
   ``ten``, and ``none``, becomes its digits; the articles ``a``, ``an`` and
   ``the`` go; a word in ``CONTRACTIONS`` becomes its contracted form; the
   words are joined by single spaces.

The annotators' answers get step 2 and 3 only, and only when they are not all the
same text (VQAv2's annotations are normalised already). The accuracy is then, for
each annotator left out in turn, min(#other annotators whose answer equals the
prediction / 3, 1), averaged over the annotators: the 10 sets of 9 for VQAv2's ten.
"""

from __future__ import annotations

import re
from typing import Sequence

__all__ = ["PUNCTUATION", "NUMBERS", "ARTICLES", "CONTRACTIONS", "strip_punctuation", "normalize_answer",
           "vqa_accuracy", "exact_match"]

PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?",
               "!")
NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
           "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = frozenset({"a", "an", "the"})


def _pairs(table: str) -> dict:
    words = table.split()
    return dict(zip(words[::2], words[1::2]))


# Word -> its contracted form, the evaluation's table entry by entry (pairs: "word form"). It keeps the
# table's oddities, which decide scores: "somebody'd" loses its apostrophe, and there is no entry for
# "im", "ive" or "shed" (the table's "Im", "Ive", "Id've" and "I'dve" hold capitals, and words are
# lower-cased before the look-up, so they never apply; "let's" and "she's" map to themselves).
CONTRACTIONS = _pairs("""
    aint ain't  arent aren't  cant can't  couldve could've  couldnt couldn't  couldn'tve couldn't've
    couldnt've couldn't've  didnt didn't  doesnt doesn't  dont don't  hadnt hadn't  hadnt've hadn't've
    hadn'tve hadn't've  hasnt hasn't  havent haven't  hed he'd  hed've he'd've  he'dve he'd've  hes he's
    howd how'd  howll how'll  hows how's  isnt isn't  itd it'd  itd've it'd've  it'dve it'd've  itll it'll
    maam ma'am  mightnt mightn't  mightnt've mightn't've  mightn'tve mightn't've  mightve might've
    mustnt mustn't  mustve must've  neednt needn't  notve not've  oclock o'clock  oughtnt oughtn't
    ow's'at 'ow's'at  'ows'at 'ow's'at  'ow'sat 'ow's'at  shant shan't  shed've she'd've  she'dve she'd've
    shouldve should've  shouldnt shouldn't  shouldnt've shouldn't've  shouldn'tve shouldn't've
    somebody'd somebodyd  somebodyd've somebody'd've  somebody'dve somebody'd've  somebodyll somebody'll
    somebodys somebody's  someoned someone'd  someoned've someone'd've  someone'dve someone'd've
    someonell someone'll  someones someone's  somethingd something'd  somethingd've something'd've
    something'dve something'd've  somethingll something'll  thats that's  thered there'd
    thered've there'd've  there'dve there'd've  therere there're  theres there's  theyd they'd
    theyd've they'd've  they'dve they'd've  theyll they'll  theyre they're  theyve they've  twas 'twas
    wasnt wasn't  wed've we'd've  we'dve we'd've  weve we've  werent weren't  whatll what'll
    whatre what're  whats what's  whatve what've  whens when's  whered where'd  wheres where's
    whereve where've  whod who'd  whod've who'd've  who'dve who'd've  wholl who'll  whos who's
    whove who've  whyll why'll  whyre why're  whys why's  wont won't  wouldve would've  wouldnt wouldn't
    wouldnt've wouldn't've  wouldn'tve wouldn't've  yall y'all  yall'll y'all'll  y'allll y'all'll
    yall'd've y'all'd've  y'alld've y'all'd've  y'all'dve y'all'd've  youd you'd  youd've you'd've
    you'dve you'd've  youll you'll  youre you're  youve you've
""")

_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
_PERIOD_BEFORE_NON_DIGIT = re.compile(r"\.(?!\d)")
_PERIODS_REMOVED = 32


def _check_text(value, name: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name}: expected a string, got {type(value).__name__} ({value!r})")
    return value


def strip_punctuation(text: str) -> str:
    """Steps 2 and 3 of the module's rules: the punctuation marks, then the periods."""
    _check_text(text, "text")
    delete_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for mark in PUNCTUATION:
        # Decided on the text as given, applied to the text as it is by now.
        spaced = f"{mark} " in text or f" {mark}" in text
        out = out.replace(mark, "" if delete_all or spaced else " ")
    return _PERIOD_BEFORE_NON_DIGIT.sub("", out, count=_PERIODS_REMOVED)


def normalize_answer(answer: str) -> str:
    """A prediction as the evaluation compares it (all four steps of the module's rules)."""
    text = _check_text(answer, "answer").replace("\n", " ").replace("\t", " ").strip()
    words = [NUMBERS.get(word, word) for word in strip_punctuation(text).lower().split()]
    return " ".join(CONTRACTIONS.get(word, word) for word in words if word not in ARTICLES)


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQAv2's accuracy of ``prediction`` against the annotators' ``answers`` (see the module's rules).

    With a single reference answer there is no set of all annotators but one (the released code
    would score 0 whatever the prediction); it is then min(match / 3, 1) over that one answer."""
    if isinstance(answers, str) or not isinstance(answers, Sequence) or len(answers) == 0:
        raise ValueError(f"answers: expected a non-empty list of reference answers, got {answers!r}")
    references = [_check_text(answer, f"answers[{index}]") for index, answer in enumerate(answers)]
    predicted = normalize_answer(prediction)
    if len(set(references)) > 1:
        references = [strip_punctuation(answer) for answer in references]
    matches = [answer == predicted for answer in references]
    if len(matches) == 1:
        return min(matches[0] / 3.0, 1.0)
    total = sum(matches)
    return sum(min((total - left_out) / 3.0, 1.0) for left_out in matches) / len(matches)


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 when the normalised prediction equals any reference answer normalised the same way."""
    predicted = normalize_answer(prediction)
    return float(any(normalize_answer(answer) == predicted for answer in answers))
