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

from typing import Optional

import torch
from torch import nn

from ..checks import INDEX_DTYPES, check_positions, check_tensor, validating
from .config import SEQ2SEQ_SCHEDULES
from .modeling import LMEyeModel, LMEyeOutput, _cross_entropy

__all__ = ["LMEyeSeq2SeqModel", "model_classes"]


class LMEyeSeq2SeqModel(LMEyeModel):
    """A frozen encoder-decoder LM and vision module with LMEye's static mapping and IPN.

    Args:
        llm: an ``AutoModelForSeq2SeqLM`` model (``T5ForConditionalGeneration``,
            ``BartForConditionalGeneration``, ...).
        config: ``LMEyeConfig`` from ``LMEyeProcessor(..., encoder_decoder=True).make_config``.
        vision, interaction: as for ``LMEyeModel``.

    Stages, ``encode_images``, ``save_pretrained`` / ``from_pretrained`` (the
    adapter only, never the LLM) are ``LMEyeModel``'s.
    """

    schedules = SEQ2SEQ_SCHEDULES
    encoder_decoder = True

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
    ):
        """Check the inputs (the keywords of ``forward``), then the encoder's output on the sequence with
        the image tokens and, for ``two_pass``, the IPN's slots filled: passes 1 and 2 of the schedule,
        what ``forward``, ``generate`` and ``score_options`` run the decoder on."""
        schedule = self._schedule(schedule)
        embeds, image_features = self._mapped_inputs(input_ids, attention_mask, image_pos, request_pos, slot_pos,
                                                     pixel_values, image_features, static_features, validate)
        if schedule == "two_pass":
            hidden = self.encoder(inputs_embeds=embeds, attention_mask=attention_mask).last_hidden_state
            # Out of place: pass 1 keeps ``embeds`` for its backward.
            embeds = self.ipn(hidden, image_features, embeds, slot_pos, request_pos=request_pos,
                              image_mask=image_mask)
        return self.encoder(inputs_embeds=embeds, attention_mask=attention_mask)

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

        ``labels`` (B, L) are the decoder's targets; the decoder reads them
        shifted right (the LLM's decoder start token first) unless
        ``decoder_input_ids`` (B, L) are given. ``logits`` (B, L, V) are the
        decoder's; ``loss`` is the mean cross-entropy of the labelled tokens.
        The images and ``image_mask`` are as for ``LMEyeModel.forward``;
        ``validate=True`` checks the positions (a host sync).
        """
        encoded = self.encode(input_ids, attention_mask, image_pos, request_pos, slot_pos, pixel_values=pixel_values,
                              image_features=image_features, static_features=static_features, image_mask=image_mask,
                              schedule=schedule, validate=validate)
        if decoder_input_ids is None:
            if labels is None:
                raise ValueError("labels / decoder_input_ids: one of them is required (the decoder's input)")
            check_tensor("labels", labels, (input_ids.shape[0], None), INDEX_DTYPES, input_ids.device,
                         dims="(B, L)")
            decoder_input_ids = self.llm.prepare_decoder_input_ids_from_labels(labels=labels)
        check_tensor("decoder_input_ids", decoder_input_ids, (input_ids.shape[0], None), INDEX_DTYPES,
                     input_ids.device, dims="(B, L)")
        if labels is not None:
            check_tensor("labels", labels, tuple(decoder_input_ids.shape), INDEX_DTYPES, input_ids.device,
                         dims="(B, L), as decoder_input_ids")
        logits = self.llm(encoder_outputs=encoded, attention_mask=attention_mask,
                          decoder_input_ids=decoder_input_ids, use_cache=False).logits
        return LMEyeOutput(loss=None if labels is None else _cross_entropy(logits, labels), logits=logits)

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
        LLM's own ``generate`` decodes on that encoding (greedy, sampling, beams: ``generate_kwargs``
        go to it), never running the encoder again. Returns the new tokens (B, L), without the
        decoder start token."""
        del labels  # a training batch may be passed as it is; its answers are not part of the prompt
        encoded = self.encode(input_ids, attention_mask, image_pos, request_pos, slot_pos, pixel_values=pixel_values,
                              image_features=image_features, static_features=static_features, image_mask=image_mask,
                              schedule=schedule)
        self._generation_defaults(generate_kwargs)
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
        hidden = self.encoder(inputs_embeds=embeds, attention_mask=attention_mask).last_hidden_state
        return self.ipn.attention_weights(hidden, image_features, request_pos=request_pos, image_mask=image_mask)


def model_classes(encoder_decoder: bool):
    """(the ``transformers`` auto class that loads the LLM, the LMEye class that wraps it) for an
    encoder-decoder LLM (its config's ``is_encoder_decoder``) or a causal one."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    return (AutoModelForSeq2SeqLM, LMEyeSeq2SeqModel) if encoder_decoder else (AutoModelForCausalLM, LMEyeModel)
