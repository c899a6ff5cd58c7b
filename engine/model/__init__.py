"""Model architectures, weights and loading."""

from engine.model.config import ModelConfig, UnsupportedModelError
from engine.model.decoder import DecoderModel
from engine.model.loader import CheckpointError

__all__ = ["CheckpointError", "DecoderModel", "ModelConfig", "UnsupportedModelError"]
