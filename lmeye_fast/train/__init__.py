"""Training LMEye at scale: the ``transformers.Trainer`` subclass, data parallelism, and the CLI
(``python -m lmeye_fast.train``)."""

from .distributed import leave_frozen_out_of_ddp, shard_frozen_llm
from .trainer import LMEyeTrainer, encoder_decoder_loss, suffix_loss

__all__ = ["LMEyeTrainer", "suffix_loss", "encoder_decoder_loss", "leave_frozen_out_of_ddp", "shard_frozen_llm"]
