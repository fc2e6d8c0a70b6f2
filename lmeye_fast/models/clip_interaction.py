"""The original work's interaction: a frozen CLIP text encoder between the requests and the sub-features."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .sources import source_of

__all__ = ["CLIPTextInteraction"]


class CLIPTextInteraction(nn.Module):
    """A ``CLIPModel``'s text tower as ``InteractiveLayer``'s interaction module, frozen.

    For each of the R requests the text transformer runs over
    ``[start-token embedding; the N*S sub-features; that request; end-token embedding]``
    with CLIP's position embeddings and causal mask (masked image tokens are
    hidden from every query); the end position's state, final-layer-normed and
    through CLIP's ``text_projection`` (the pooled, projected text embedding), is
    the request's result. The R sequences of every batch row run as one batch.

    The released code reads one request and widens the single result into all
    ``<img-d>`` tokens with its transmission; here each ``<img-d>`` token has its
    own request (``InteractiveLayer``'s W_q gives R of them) and its own pass.

    Args:
        clip: a Hugging Face ``CLIPModel`` (its ``text_model`` and
            ``text_projection`` are used, not copied). Its text width is the
            interaction width Di and must equal the projection width.
        num_requests: R, the requests at the end of the sequence the layer passes.
        trainable: leave the text tower trainable (the original keeps it frozen;
            ``LMEyeModel.set_stage`` keeps whichever is chosen here).

    Called as ``module(sequence, mask)`` on ``[sub-features; requests]``
    (B, N*S + R, Di) with a (B, N*S + R) bool keep-mask or None, it returns
    (B, R, Di): the outputs at the request positions, which is what the layer reads.
    """

    def __init__(self, clip: nn.Module, num_requests: int, trainable: bool = False):
        super().__init__()
        text_model, projection = getattr(clip, "text_model", None), getattr(clip, "text_projection", None)
        if not isinstance(text_model, nn.Module) or not isinstance(projection, nn.Linear):
            raise ValueError(f"clip: expected a CLIPModel with text_model and text_projection, got "
                             f"{type(clip).__name__}")
        if not isinstance(num_requests, int) or num_requests < 1:
            raise ValueError(f"num_requests: expected a positive int, got {num_requests!r}")
        config = text_model.config
        if projection.out_features != config.hidden_size:
            raise ValueError(f"clip: the text projection maps {config.hidden_size} to {projection.out_features}; "
                             "the interaction needs them equal (its output is read at the request width)")
        ids = (config.bos_token_id, config.eos_token_id)
        if any(not isinstance(i, int) or not 0 <= i < config.vocab_size for i in ids):
            raise ValueError(f"clip: the text config's bos/eos token ids {ids} are not in its vocabulary of "
                             f"{config.vocab_size}")
        self.embeddings = text_model.embeddings
        self.encoder = text_model.encoder
        self.final_layer_norm = text_model.final_layer_norm
        self.text_projection = projection
        self.num_requests = num_requests
        self.source = source_of(clip)  # where the CLIPModel came from, for the adapter's record
        self.register_buffer("boundary_ids", torch.tensor(ids), persistent=False)
        self.requires_grad_(trainable)

    @property
    def width(self) -> int:
        return self.text_projection.out_features

    def extra_repr(self) -> str:
        return f"width={self.width}, requests={self.num_requests}"

    def forward(self, sequence: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        batch, length, width = sequence.shape
        requests = self.num_requests
        if width != self.width or length <= requests:
            raise ValueError(f"sequence: expected (B, N*S + R, Di) with R = {requests}, Di = {self.width}, "
                             f"got {tuple(sequence.shape)}")
        features = length - requests
        rows = batch * requests
        dtype = self.text_projection.weight.dtype
        start, end = self.embeddings.token_embedding(self.boundary_ids).to(dtype)
        sub_features = sequence[:, None, :features].to(dtype).expand(batch, requests, features, width)
        parts = [start.expand(rows, 1, width), sub_features.reshape(rows, features, width),
                 sequence[:, features:].to(dtype).reshape(rows, 1, width), end.expand(rows, 1, width)]
        hidden = self.embeddings(inputs_embeds=torch.cat(parts, dim=1))

        total = features + 3
        allowed = torch.ones(total, total, dtype=torch.bool, device=sequence.device).tril()[None, None]
        if mask is not None:
            # Every row of the batch runs R times: its image keep-mask goes with each; start,
            # request and end are always visible.
            shown = torch.ones(batch, total, dtype=torch.bool, device=sequence.device)
            shown[:, 1:1 + features] = mask[:, :features]
            allowed = allowed & shown.repeat_interleave(requests, dim=0)[:, None, None, :]
        bias = torch.zeros(allowed.shape, dtype=dtype, device=sequence.device)
        bias = bias.masked_fill(~allowed, torch.finfo(dtype).min).expand(rows, 1, total, total)
        states = self.encoder(inputs_embeds=hidden, attention_mask=bias).last_hidden_state
        pooled = self.final_layer_norm(states[:, -1])
        return self.text_projection(pooled).reshape(batch, requests, width).to(sequence.dtype)
