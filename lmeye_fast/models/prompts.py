"""How a conversation's text is laid around LMEye's tokens: the prompt template.

A row of turns ``(question_1, answer_1), (question_2, answer_2), ...`` reads, for an image::

    [bos] first_turn(image, question_1) [<img-q>] [<img-d> x R] response_prefix answer_1 [eos]
          later_turn(question_2) response_prefix answer_2 [eos] ...

``first_turn`` places the image (``{image}``, the N ``<img>`` tokens) and the question
(``{question}``); ``request_token`` says whether ``<img-q>`` ends it (without one the request
is read at the first ``<img-d>`` slot). Every piece of text is tokenized on its own, with
``add_special_tokens=False``; BOS comes first when ``add_bos`` says so. ``LMEyeProcessor``
holds one template, saves it with the adapter (``save_pretrained``) and builds every prompt of
training, scoring and generation from it (``LMEyeProcessor.row``).

A LLaVA record marks the image's place in its first question with ``<image>``. A template with
``{image}`` puts the image there and drops the tag (with the newline that goes with it), as
LLaVA's own preprocessing moves the image to the front; a template without ``{image}`` puts the
image where the tag (or the processor's ``<img>``) stands in the question, else first.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Dict, Optional, Tuple, Union

from ..checks import check_known_fields

__all__ = ["PromptTemplate", "Turn", "PROMPT_TEMPLATES", "prompt_template", "LLAVA_IMAGE_TAG"]

LLAVA_IMAGE_TAG = "<image>"
# The newline LLaVA writes before or after the tag belongs to it.
_TAG_FORMS = (LLAVA_IMAGE_TAG + "\n", "\n" + LLAVA_IMAGE_TAG, LLAVA_IMAGE_TAG)


@dataclass(frozen=True)
class Turn:
    """One exchange of a conversation; ``answer`` None for the question a prompt asks."""

    question: str
    answer: Optional[str] = None


@dataclass(frozen=True)
class PromptTemplate:
    """The text around the turns (see the module's docstring for the row it gives).

    Attributes:
        first_turn: the first turn's text up to the slots, with ``{question}`` and, where
            the image goes, ``{image}`` (write literal braces as ``{{`` and ``}}``).
        later_turn: a later turn's text before its response prefix, with ``{question}``.
        response_prefix: the text between the slots (a later turn's question) and the answer.
        request_token: ``<img-q>`` ends the first turn, and the request is read there;
            False: no request token, the request is read at the first ``<img-d>`` slot.
        add_bos: put the tokenizer's BOS token first; None: when it has one that differs
            from EOS (``LMEyeProcessor`` resolves it).
        name: what the template is called (``PROMPT_TEMPLATES``), for messages and records.
    """

    first_turn: str = "{question}"
    later_turn: str = "{question}"
    response_prefix: str = ""
    request_token: bool = True
    add_bos: Optional[bool] = None
    name: str = "custom"

    def __post_init__(self):
        for field in ("first_turn", "later_turn", "response_prefix", "name"):
            if not isinstance(getattr(self, field), str):
                raise ValueError(f"prompt template {self.name!r}: {field} must be a string, got "
                                 f"{type(getattr(self, field)).__name__}")
        if not isinstance(self.request_token, bool) or not (self.add_bos is None or isinstance(self.add_bos, bool)):
            raise ValueError(f"prompt template {self.name!r}: request_token must be a bool and add_bos a bool or "
                             f"None, got {self.request_token!r} and {self.add_bos!r}")
        for field, allowed in (("first_turn", ("image", "question")), ("later_turn", ("question",))):
            text = getattr(self, field)
            probe = {key: f"\0{key}\0" for key in allowed}
            try:
                filled = text.format(**probe)
            except (KeyError, IndexError, ValueError) as error:
                raise ValueError(f"prompt template {self.name!r}: {field} {text!r} may hold only "
                                 f"{', '.join('{' + key + '}' for key in allowed)} as fields ({error!r})") from None
            for key in allowed:
                count = filled.count(probe[key])
                if count > 1 or (key == "question" and count != 1):
                    raise ValueError(f"prompt template {self.name!r}: {field} {text!r} must hold "
                                     f"{'{' + key + '}'} {'exactly' if key == 'question' else 'at most'} once, "
                                     f"got {count}")

    @property
    def places_image(self) -> bool:
        """Whether ``first_turn`` says where the image goes (``{image}``)."""
        return "\0" in self.first_turn.format(image="\0", question="")

    def first_pieces(self, question: str, image: bool, image_token: str) -> Tuple[str, Optional[str]]:
        """The first turn's text around its image: ``(before, after)``, ``after`` None without image.

        ``question`` may mark the image's place with LLaVA's ``<image>`` tag or with ``image_token``
        (the processor's ``<img>``) when the template does not place it; a question without image may
        hold neither.
        """
        tags = sum(question.count(mark) for mark in (LLAVA_IMAGE_TAG, image_token))
        if tags > 1 or (tags and (not image or self.places_image and image_token in question)):
            where = "in a question without image" if not image else \
                f"beside the template {self.name!r}, which places the image itself" if self.places_image else \
                "in a question"
            raise ValueError(f"prompts: expected {'no' if not image or self.places_image else 'at most one'} "
                             f"{LLAVA_IMAGE_TAG!r} or {image_token!r} {where}, got {tags} in {question!r}")
        if self.places_image or not image:
            question = _without_tag(question)
            before, _, after = self.first_turn.format(image="\0", question="\1").partition("\0")
            fill = [part.replace("\1", question) for part in (before, after)]
            return (fill[0] + fill[1], None) if not image else (fill[0], fill[1])
        text = self.first_turn.format(image="", question=_tag_as(question.strip(), image_token))
        before, found, after = text.partition(image_token)
        return ("", text) if not found else (before, after)

    def later_text(self, question: str) -> str:
        if LLAVA_IMAGE_TAG in question:
            raise ValueError(f"prompts: only the first question may hold {LLAVA_IMAGE_TAG!r}, got {question!r}")
        return self.later_turn.format(question=question)

    def to_dict(self) -> Dict[str, object]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Dict[str, object]) -> "PromptTemplate":
        check_known_fields(cls, data, "prompt template")
        return cls(**data)


def _without_tag(question: str) -> str:
    for form in _TAG_FORMS:
        if form in question:
            return question.replace(form, "", 1).strip()
    return question.strip()


def _tag_as(question: str, image_token: str) -> str:
    for form in _TAG_FORMS:
        if form in question:
            return question.replace(form, image_token, 1)
    return question


PROMPT_TEMPLATES: Dict[str, PromptTemplate] = {
    # The question as it is: the image where it marks it, else first; the response prefix after the slots.
    "plain": PromptTemplate(name="plain"),
    # Vicuna v1's turns, as LLaVA trains them: the image opens the first user turn.
    "vicuna": PromptTemplate(first_turn="USER: {image}{question}", later_turn="USER: {question}",
                             response_prefix=" ASSISTANT: ", name="vicuna"),
    # LMEye v1's released prompts (lmeye_fast.models.released): the request at the first <img-d>.
    "lmeye-v1-qa": PromptTemplate(first_turn="Image as evidence: {image}\n Question: {question}",
                                  response_prefix="\nAnswer:", request_token=False, add_bos=False,
                                  name="lmeye-v1-qa"),
    "lmeye-v1-instruction": PromptTemplate(first_turn="Image: {image}\n {question}", response_prefix="\nAnswer:",
                                           request_token=False, add_bos=False, name="lmeye-v1-instruction"),
    "lmeye-v1-demo": PromptTemplate(first_turn="Image is {image}\n {question}", response_prefix="\nAnswer:",
                                    request_token=False, add_bos=False, name="lmeye-v1-demo"),
}


def prompt_template(template: Union[str, PromptTemplate, Dict[str, object]]) -> PromptTemplate:
    """A ``PromptTemplate`` from itself, its name in ``PROMPT_TEMPLATES`` or its ``to_dict()``."""
    if isinstance(template, PromptTemplate):
        return template
    if isinstance(template, dict):
        return PromptTemplate.from_dict(template)
    if isinstance(template, str) and template in PROMPT_TEMPLATES:
        return PROMPT_TEMPLATES[template]
    raise ValueError(f"template: expected a PromptTemplate or one of {sorted(PROMPT_TEMPLATES)}, got {template!r}")
