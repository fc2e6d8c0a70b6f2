"""The original work's interaction: a frozen CLIP text encoder between the requests and the sub-features."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .sources import source_of

__all__ = ["CLIPTextInteraction"]


POSITIONS = ("all", "ends")
# The end-of-text id of CLIP text configs written before transformers corrected it (openai's
# checkpoints on the hub still carry it, with bos_token_id 0).
LEGACY_EOS_ID = 2


def _boundary_ids(config):
    """CLIP's start- and end-of-text ids. A legacy config's ids name ordinary words; CLIP's own are
    the last two of its vocabulary (49406, 49407), which is where transformers' CLIP text model
    itself looks for the end of text under such a config."""
    if config.eos_token_id == LEGACY_EOS_ID:
        return config.vocab_size - 2, config.vocab_size - 1
    return config.bos_token_id, config.eos_token_id
REQUEST_PASSES = ("separate", "joint")


class CLIPTextInteraction(nn.Module):
    """A ``CLIPModel``'s text tower as ``InteractiveLayer``'s interaction module, frozen.

    The text transformer runs over ``[start-token embedding; the N*S sub-features; request(s);
    end-token embedding]`` with CLIP's causal mask (masked image tokens are hidden from every
    query); the rows then pass CLIP's final layer norm and ``text_projection``. Two choices say how:

    ``requests``: ``"separate"`` (default) runs one sequence per request, ``[start; sub-features;
    request r; end]``, and reads its end row (CLIP's pooled, projected text embedding), the R
    sequences of every batch row as one batch; with one request this is v1 LMEye's pass.
    ``"joint"`` runs one sequence with all R requests, ``[start; sub-features; R requests; end]``,
    and reads its last R rows, as LMEye v0.1 reads them (the last R - 1 requests and the end row).

    ``positions``: ``"all"`` (default) adds CLIP's position embeddings to every row; ``"ends"``
    only to the start row (position 0) and the end row (the last position), as both LMEye
    releases build the sequence: the rows in between enter without positions.

    Args:
        clip: a Hugging Face ``CLIPModel`` (its ``text_model`` and
            ``text_projection`` are used, not copied). Its text width is the
            interaction width Di and must equal the projection width.
        num_requests: R, the requests at the end of the sequence the layer passes.
        trainable: leave the text tower trainable (the original keeps it frozen;
            ``LMEyeModel.set_stage`` keeps whichever is chosen here).
        requests, positions: as above.

    Called as ``module(sequence, mask)`` on ``[sub-features; requests]``
    (B, N*S + R, Di) with a (B, N*S + R) bool keep-mask or None, it returns
    (B, R, Di): one result per request, which is what the layer reads.
    """

    def __init__(self, clip: nn.Module, num_requests: int, trainable: bool = False, requests: str = "separate",
                 positions: str = "all"):
        super().__init__()
        text_model, projection = getattr(clip, "text_model", None), getattr(clip, "text_projection", None)
        if not isinstance(text_model, nn.Module) or not isinstance(projection, nn.Linear):
            raise ValueError(f"clip: expected a CLIPModel with text_model and text_projection, got "
                             f"{type(clip).__name__}")
        if not isinstance(num_requests, int) or num_requests < 1:
            raise ValueError(f"num_requests: expected a positive int, got {num_requests!r}")
        if requests not in REQUEST_PASSES:
            raise ValueError(f"requests: expected one of {REQUEST_PASSES}, got {requests!r}")
        if positions not in POSITIONS:
            raise ValueError(f"positions: expected one of {POSITIONS}, got {positions!r}")
        config = text_model.config
        if projection.out_features != config.hidden_size:
            raise ValueError(f"clip: the text projection maps {config.hidden_size} to {projection.out_features}; "
                             "the interaction needs them equal (its output is read at the request width)")
        ids = _boundary_ids(config)
        if any(not isinstance(i, int) or not 0 <= i < config.vocab_size for i in ids):
            raise ValueError(f"clip: the text config's bos/eos token ids {ids} are not in its vocabulary of "
                             f"{config.vocab_size}")
        self.embeddings = text_model.embeddings
        self.encoder = text_model.encoder
        self.final_layer_norm = text_model.final_layer_norm
        self.text_projection = projection
        self.num_requests = num_requests
        self.requests, self.positions = requests, positions
        self.max_positions = config.max_position_embeddings
        self.source = source_of(clip)  # where the CLIPModel came from, for the adapter's record
        self.register_buffer("boundary_ids", torch.tensor(ids), persistent=False)
        self.requires_grad_(trainable)

    @property
    def options(self) -> dict:
        """The choices that change what it computes, recorded in the adapter's config so that a loader
        passing another kind of pass is refused."""
        return {"requests": self.requests, "positions": self.positions}

    @property
    def width(self) -> int:
        return self.text_projection.out_features

    def extra_repr(self) -> str:
        return f"width={self.width}, requests={self.num_requests} ({self.requests}), positions={self.positions}"

    def forward(self, sequence: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        batch, length, width = sequence.shape
        requests = self.num_requests
        if width != self.width or length <= requests:
            raise ValueError(f"sequence: expected (B, N*S + R, Di) with R = {requests}, Di = {self.width}, "
                             f"got {tuple(sequence.shape)}")
        features = length - requests
        joint = self.requests == "joint"
        # Rows of the text transformer's batch, and requests in each of its sequences.
        rows, per_row = (batch, requests) if joint else (batch * requests, 1)
        total = features + per_row + 2
        if total > self.max_positions:
            raise ValueError(f"sequence: {features} sub-features and {per_row} request(s) make a text sequence of "
                             f"{total} rows, more than the CLIP text tower's {self.max_positions} positions")
        dtype = self.text_projection.weight.dtype
        start, end = self.embeddings.token_embedding(self.boundary_ids).to(dtype)
        if joint:
            body = sequence.to(dtype)
        else:
            sub_features = sequence[:, None, :features].to(dtype).expand(batch, requests, features, width)
            body = torch.cat([sub_features.reshape(rows, features, width),
                              sequence[:, features:].to(dtype).reshape(rows, 1, width)], dim=1)
        tokens = torch.cat([start.expand(rows, 1, width), body, end.expand(rows, 1, width)], dim=1)
        position = self.embeddings.position_embedding.weight[:total].to(dtype)
        if self.positions == "ends":
            ends = torch.zeros(total, 1, dtype=dtype, device=position.device)
            ends[[0, -1]] = 1
            position = position * ends
        hidden = tokens + position

        allowed = torch.ones(total, total, dtype=torch.bool, device=sequence.device).tril()[None, None]
        if mask is not None:
            # Each sequence of a batch row hides that row's masked image tokens; start, requests and end
            # are always visible.
            shown = torch.ones(batch, total, dtype=torch.bool, device=sequence.device)
            shown[:, 1:1 + features] = mask[:, :features]
            if not joint:
                shown = shown.repeat_interleave(requests, dim=0)
            allowed = allowed & shown[:, None, None, :]
        bias = torch.zeros(allowed.shape, dtype=dtype, device=sequence.device)
        bias = bias.masked_fill(~allowed, torch.finfo(dtype).min).expand(rows, 1, total, total)
        states = self.encoder(inputs_embeds=hidden, attention_mask=bias).last_hidden_state
        read = states[:, -requests:] if joint else states[:, -1]
        return self.text_projection(self.final_layer_norm(read)).reshape(batch, requests, width).to(sequence.dtype)
