"""PocketRec device SDK: numpy + LiteRT + cryptography only (no torch, flask, sqlalchemy)."""

from device_sdk.bundle import Bundle, BundleError, GoldenCheckError, load_bundle
from device_sdk.item_vocab import ItemVocab
from device_sdk.topk_model import ModelLoadError, TopKModel

__all__ = [
    "Bundle",
    "BundleError",
    "GoldenCheckError",
    "ItemVocab",
    "ModelLoadError",
    "TopKModel",
    "load_bundle",
]
