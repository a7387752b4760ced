"""Siren's model family: one class configured by distribution "K-m" and conditioning."""
from siren.model.collaborative import CollaborativeModel
from siren.model.config import ARCHS, CONDITIONINGS, DISTRIBUTIONS, SCALES, ModelConfig, presets
from siren.model.expert import Expert, ExpertLoss, ExpertState

__all__ = ["CollaborativeModel", "Expert", "ExpertLoss", "ExpertState", "ModelConfig", "SCALES", "ARCHS",
           "DISTRIBUTIONS", "CONDITIONINGS", "presets"]
