"""LMEye around a Hugging Face encoder-decoder LM (T5 / FlanT5, BART, mT5): two encoder passes, one decoder.

The instruction, the ``<img>`` tokens, ``<img-q>`` and the ``<img-d>`` slots
are the encoder's input; the answer is the decoder's. The encoder is
bidirectional: every column, ``<img-q>`` included, sees the slots, so no prefix
is the same in both passes and the single-pass schedule of a causal LLM does
not apply. Schedules (docs/encoder_decoder.md):

``two_pass``
    Encoder pass 1 over the sequence with the slot rows holding their learned
    ``<img-d>`` embedding (as ``LMEyeModel``'s two-pass schedule), the request
    read at ``<img-q>``; the IPN fills the slots; encoder pass 2 over the
    filled sequence; the decoder runs once, on the second encoding. Pass 1 is
    never followed by a decoder. Generation encodes once this way and decodes
    every step and every beam on that encoding.
``static``
    The static-only model: one encoder pass, no IPN, the decoder on it.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn
from transformers.utils import ModelOutput

from ..checks import INDEX_DTYPES, check_positions, check_tensor, validating
from .config import SEQ2SEQ_SCHEDULES
from .modeling import LMEyeBaseModel, LMEyeModel, LMEyeOutput, labelled_loss
from .processor import IGNORE_INDEX

__all__ = ["LMEyeSeq2SeqModel", "model_classes", "UNSUPPORTED_FAMILIES"]

# The encoder-decoder families (``config.model_type``) LMEyeSeq2SeqModel refuses, and why.
UNSUPPORTED_FAMILIES = {
    "fsmt": "its decoder is causal only when the model embeds the encoder's input_ids itself (FSMTModel builds "
            "the causal mask from them); handed the encoder's output, as LMEye hands it, the decoder would see "
            "the tokens it is to predict",
}


def _decoder_start_token_id(llm: nn.Module) -> Optional[int]:
    """The token the LLM's decoder starts from: its generation config's, else its config's; None if neither
    names a single one."""
    for settings in (getattr(llm, "generation_config", None), getattr(llm, "config", None)):
        start = getattr(settings, "decoder_start_token_id", None)
        if isinstance(start, int):
            return start
    return None


def _rows_of(encoded: ModelOutput, rows: torch.Tensor) -> ModelOutput:
    """The encoder's output (of its own class: a mixture of experts' carries its router logits, which its
    decoder reads) with row ``rows[k]`` of every tensor in row k, as ``generate`` repeats an encoding per
    beam; per-layer tuples are left as they are, as there."""
    return type(encoded)(**{key: value[rows] if isinstance(value, torch.Tensor) else value
                            for key, value in encoded.items()})


class LMEyeSeq2SeqModel(LMEyeBaseModel):
    """A frozen encoder-decoder LM and vision module with LMEye's static mapping and IPN.

    Args:
        llm: an ``AutoModelForSeq2SeqLM`` model (``T5ForConditionalGeneration``,
            ``BartForConditionalGeneration``, ...) whose config or generation config names its
            ``decoder_start_token_id``.
        config: ``LMEyeConfig`` from ``LMEyeProcessor(..., encoder_decoder=True).make_config``.
        vision, interaction: as for ``LMEyeBaseModel``.

    Stages, ``encode_images``, ``save_pretrained`` / ``from_pretrained`` (the
    adapter only, never the LLM) are ``LMEyeBaseModel``'s. The decoder reads
    ``decoder_inputs``: the decoder start token, then the answer shifted right,
    the same for every family, in training, scoring and generation.
    """

    schedules = SEQ2SEQ_SCHEDULES
    ipn_schedule = "two_pass"  # an encoder has no single pass
    encoder_decoder = True

    @classmethod
    def check_llm(cls, llm: nn.Module) -> None:
        name = type(llm).__name__
        if not getattr(getattr(llm, "config", None), "is_encoder_decoder", False):
            raise ValueError(f"llm: {name} is a decoder-only LLM; wrap it in LMEyeModel")
        family = getattr(llm.config, "model_type", None)
        if family in UNSUPPORTED_FAMILIES:
            raise ValueError(f"llm: {name} ({family}) is not supported: {UNSUPPORTED_FAMILIES[family]}")
        if not callable(getattr(llm, "get_encoder", None)):
            raise ValueError(f"llm: {name} has no get_encoder(); LMEye runs the encoder on its own sequence")
        if _decoder_start_token_id(llm) is None:
            raise ValueError(f"llm: {name} names no decoder_start_token_id (in its config or generation config); "
                             "set llm.config.decoder_start_token_id to the token its decoder starts from (T5: "
                             "the pad token, BART: EOS)")

    @property
    def decoder_start_token_id(self) -> int:
        """The token the decoder starts from: the LLM's generation config's, else its config's."""
        return _decoder_start_token_id(self.llm)

    @property
    def encoder(self) -> nn.Module:
        return self.llm.get_encoder()

    @property
    def reader(self) -> nn.Module:
        return self.encoder

    def _mapped_inputs(self, input_ids, attention_mask, image_pos, request_pos, slot_pos, pixel_values,
                       image_features, static_features, validate):
        """Check the inputs; (the embedded sequence with the static mapping's image tokens, the IPN's
        image features)."""
        batch, total, device = self._token_inputs(input_ids, attention_mask)
        static_features, image_features = self._image_inputs(batch, device, pixel_values, image_features,
                                                              static_features)
        for name, value in (("request_pos", request_pos), ("slot_pos", slot_pos)):
            if value is None:
                raise ValueError(f"{name}: required for an encoder-decoder LLM, whose rows are right-padded "
                                 "(the processor gives it)")
        self._position_inputs(batch, device, image_pos, request_pos, slot_pos)
        if validating(validate):
            check_positions("image_pos", image_pos, total, distinct=True)
            check_positions("request_pos", request_pos, total)
            check_positions("slot_pos", slot_pos, total, distinct=True)
        return self.mapped_embeds(input_ids, static_features, image_pos), image_features

    def _run_encoder(self, embeds: torch.Tensor, attention_mask: torch.Tensor) -> ModelOutput:
        # ``input_ids=None`` named: some encoders (FSMT's) take it as a required argument.
        return self.encoder(input_ids=None, inputs_embeds=embeds, attention_mask=attention_mask)

    def encode(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        image_pos: torch.Tensor,
        request_pos: torch.Tensor,
        slot_pos: torch.Tensor,
        pixel_values: Optional[torch.Tensor] = None,
        image_features: Optional[torch.Tensor] = None,
        static_features: Optional[torch.Tensor] = None,
        image_mask: Optional[torch.Tensor] = None,
        schedule: Optional[str] = None,
        validate: bool = False,
    ) -> ModelOutput:
        """Check the inputs (the keywords of ``forward``), then the encoder's output on the sequence with
        the image tokens and, for ``two_pass``, the IPN's slots filled: passes 1 and 2 of the schedule,
        what ``forward``, ``generate`` and ``answer_logits`` run the decoder on. It is the encoder's own
        output object, passed on to the decoder as it is."""
        schedule = self._schedule(schedule)
        embeds, image_features = self._mapped_inputs(input_ids, attention_mask, image_pos, request_pos, slot_pos,
                                                     pixel_values, image_features, static_features, validate)
        if schedule == "two_pass":
            hidden = self._run_encoder(embeds, attention_mask).last_hidden_state
            # Out of place: pass 1 keeps ``embeds`` for its backward.
            embeds = self.ipn(hidden, image_features, embeds, slot_pos, request_pos=request_pos,
                              image_mask=image_mask)
        return self._run_encoder(embeds, attention_mask)

    def decoder_inputs(self, labels: torch.Tensor) -> torch.Tensor:
        """The decoder's input (B, L) for ``labels`` (B, L): ``decoder_start_token_id``, then the labels
        shifted right by one (the last left out), ``IGNORE_INDEX`` read as the pad token. One rule for
        every family, whatever its own label shift (mBART's wraps the last token to the front): the
        decoder reads what ``generate`` feeds it, the start token and then each token produced."""
        start = labels.new_full((labels.shape[0], 1), self.decoder_start_token_id)
        shifted = torch.cat([start, labels[:, :-1]], dim=1)
        # Without a pad token the start token fills the padding: what follows a row's last label is
        # never read by its causal decoder.
        pad = self.config.pad_token_id if self.config.pad_token_id is not None else self.decoder_start_token_id
        return shifted.masked_fill(shifted == IGNORE_INDEX, pad)

    def decode(self, encoded: ModelOutput, attention_mask: torch.Tensor,
               decoder_input_ids: torch.Tensor) -> torch.Tensor:
        """The decoder's logits (B, L, V) on ``decoder_input_ids`` (B, L), cross-attending to ``encoded``
        (``encode``'s output) under the encoder's ``attention_mask`` (B, T).

        Every decoder column is read, causally, as ``generate`` reads them: none is masked as padding,
        which some families (T5Gemma) would otherwise do to a decoder start token that is the pad
        token, leaving its column nothing to attend to but the columns after it."""
        return self.llm(encoder_outputs=encoded, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids,
                        decoder_attention_mask=torch.ones_like(decoder_input_ids), use_cache=False).logits

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        image_pos: torch.Tensor,
        request_pos: torch.Tensor,
        slot_pos: torch.Tensor,
        labels: Optional[torch.Tensor] = None,
        decoder_input_ids: Optional[torch.Tensor] = None,
        pixel_values: Optional[torch.Tensor] = None,
        image_features: Optional[torch.Tensor] = None,
        static_features: Optional[torch.Tensor] = None,
        image_mask: Optional[torch.Tensor] = None,
        schedule: Optional[str] = None,
        validate: bool = False,
    ) -> LMEyeOutput:
        """Run one batch of ``LMEyeProcessor(..., encoder_decoder=True)`` (``model(**batch)``).

        ``labels`` (B, L) are the decoder's targets; the decoder reads
        ``decoder_inputs(labels)`` unless ``decoder_input_ids`` (B, L) are given.
        ``logits`` (B, L, V) are the decoder's; ``loss`` is the mean cross-entropy
        of the labelled tokens. The images and ``image_mask`` are as for
        ``LMEyeModel.forward``; ``validate=True`` checks the positions (a host sync).
        """
        encoded = self.encode(input_ids, attention_mask, image_pos, request_pos, slot_pos, pixel_values=pixel_values,
                              image_features=image_features, static_features=static_features, image_mask=image_mask,
                              schedule=schedule, validate=validate)
        if decoder_input_ids is None:
            if labels is None:
                raise ValueError("labels / decoder_input_ids: one of them is required (the decoder's input)")
            check_tensor("labels", labels, (input_ids.shape[0], None), INDEX_DTYPES, input_ids.device,
                         dims="(B, L)")
            decoder_input_ids = self.decoder_inputs(labels)
        check_tensor("decoder_input_ids", decoder_input_ids, (input_ids.shape[0], None), INDEX_DTYPES,
                     input_ids.device, dims="(B, L)")
        if labels is not None:
            check_tensor("labels", labels, tuple(decoder_input_ids.shape), INDEX_DTYPES, input_ids.device,
                         dims="(B, L), as decoder_input_ids")
        logits = self.decode(encoded, attention_mask, decoder_input_ids)
        return LMEyeOutput(loss=None if labels is None else labelled_loss(*self.loss_targets(logits, labels)),
                           logits=logits)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        image_pos: torch.Tensor,
        request_pos: torch.Tensor,
        slot_pos: torch.Tensor,
        pixel_values: Optional[torch.Tensor] = None,
        image_features: Optional[torch.Tensor] = None,
        static_features: Optional[torch.Tensor] = None,
        image_mask: Optional[torch.Tensor] = None,
        schedule: Optional[str] = None,
        labels: Optional[torch.Tensor] = None,
        **generate_kwargs,
    ) -> torch.Tensor:
        """Generate answers for a batch of prompts: the schedule's two encoder passes once, then the
        LLM's own ``generate`` decodes on that encoding from ``decoder_start_token_id`` (greedy,
        sampling, beams: ``generate_kwargs`` go to it), never running the encoder again. Returns the
        new tokens (B, L), without the decoder start token."""
        del labels  # a training batch may be passed as it is; its answers are not part of the prompt
        encoded = self.encode(input_ids, attention_mask, image_pos, request_pos, slot_pos, pixel_values=pixel_values,
                              image_features=image_features, static_features=static_features, image_mask=image_mask,
                              schedule=schedule)
        self._generation_defaults(generate_kwargs)
        generate_kwargs.setdefault("decoder_start_token_id", self.decoder_start_token_id)
        tokens = self.llm.generate(encoder_outputs=encoded, attention_mask=attention_mask, **generate_kwargs)
        return tokens[:, 1:]

    @torch.no_grad()
    def attention_weights(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        image_pos: torch.Tensor,
        request_pos: torch.Tensor,
        slot_pos: torch.Tensor,
        pixel_values: Optional[torch.Tensor] = None,
        image_features: Optional[torch.Tensor] = None,
        static_features: Optional[torch.Tensor] = None,
        image_mask: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        decoder_input_ids: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """What each request attended to (B, H, R, M*S), as ``LMEyeModel.attention_weights``: the requests
        are read from encoder pass 1."""
        del labels, decoder_input_ids  # a batch is passed as it is; only the encoder's input is read
        embeds, image_features = self._mapped_inputs(input_ids, attention_mask, image_pos, request_pos, slot_pos,
                                                     pixel_values, image_features, static_features, False)
        hidden = self._run_encoder(embeds, attention_mask).last_hidden_state
        return self.ipn.attention_weights(hidden, image_features, request_pos=request_pos, image_mask=image_mask)

    # ------------------------------------------------------------- loss and scoring

    @staticmethod
    def loss_targets(logits: torch.Tensor, labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """The decoder's logits (B, L, V) predict its labels (B, L) column for column (the decoder reads
        them shifted right): both as they are."""
        return logits, labels

    @staticmethod
    def loss(outputs, labels: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
        """The loss of an encoder-decoder LLM: the decoder's ``outputs.logits`` (B, L, V) predict ``labels``
        (B, L) column by column (the decoder reads its input shifted right). Summed and divided by
        ``num_items_in_batch`` (the mean without it)."""
        return labelled_loss(outputs.logits, labels, num_items_in_batch)

    @torch.no_grad()
    def answer_logits(self, answers: torch.Tensor, rows: torch.Tensor, **batch) -> torch.Tensor:
        """``LMEyeBaseModel.answer_logits``: the schedule's encoder passes (and the IPN between them) once
        per prompt, then the decoder once over the K answers (``decoder_inputs``, as in training), on each
        prompt's encoding repeated (not recomputed) once per answer. Right padding sits after every real
        token, so the causal decoder keeps it out of the real tokens' logits."""
        encoded = self.encode(**batch)
        return self.decode(_rows_of(encoded, rows), batch["attention_mask"][rows], self.decoder_inputs(answers))


def model_classes(encoder_decoder: bool):
    """(the ``transformers`` auto class that loads the LLM, the LMEye class that wraps it) for an
    encoder-decoder LLM (its config's ``is_encoder_decoder``) or a causal one."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    return (AutoModelForSeq2SeqLM, LMEyeSeq2SeqModel) if encoder_decoder else (AutoModelForCausalLM, LMEyeModel)
