"""Repeat-aware SASRec: SASRec's explore logits plus a learned repeat score over the items
already in the history (recency by age, frequency gated by the user state, a per-item repeat
bias), all computed in the serving graph from the history input."""

from model_zoo.registry import Architecture, register
from model_zoo.repeat_sasrec.config import RepeatSasRecConfig
from model_zoo.repeat_sasrec.numpy_twin import RepeatSasRecNumpy, serving_constants

ARCHITECTURE = register(
    Architecture(
        name="repeat_sasrec",
        config_cls=RepeatSasRecConfig,
        numpy_cls=RepeatSasRecNumpy,
        serving_constants=serving_constants,
        torch_path="model_zoo.repeat_sasrec.torch_module:RepeatSasRec",
    )
)

__all__ = ["ARCHITECTURE", "RepeatSasRecConfig", "RepeatSasRecNumpy"]
