"""PocketRec device SDK: numpy + LiteRT + cryptography + urllib3 only (no torch, flask,
sqlalchemy). Apps use ``DeviceClient``; the parts are importable for finer control."""

from device_sdk.bundle import Bundle, BundleError, GoldenCheckError, load_bundle
from device_sdk.device_client import DeviceClient, ModelNotReadyError, SyncReport
from device_sdk.event_log import EVENT_KINDS, Event, EventLog, EventLogError, SchemaVersionError
from device_sdk.item_vocab import ItemVocab
from device_sdk.local_trainer import LocalTrainer, LocalTrainingConfig
from device_sdk.model_store import ModelStore, StaleVersionError
from device_sdk.model_update import ModelUpdate
from device_sdk.protocol import ProtocolError, RoundTask
from device_sdk.recommender import HistoryPolicy, Recommendation, Recommender
from device_sdk.sync_client import SyncClient, SyncError
from device_sdk.topk_model import ModelLoadError, TopKModel

__all__ = [
    "EVENT_KINDS",
    "Bundle",
    "BundleError",
    "DeviceClient",
    "Event",
    "EventLog",
    "EventLogError",
    "GoldenCheckError",
    "HistoryPolicy",
    "ItemVocab",
    "LocalTrainer",
    "LocalTrainingConfig",
    "ModelLoadError",
    "ModelNotReadyError",
    "ModelStore",
    "ModelUpdate",
    "ProtocolError",
    "Recommendation",
    "Recommender",
    "RoundTask",
    "SchemaVersionError",
    "StaleVersionError",
    "SyncClient",
    "SyncError",
    "SyncReport",
    "TopKModel",
    "load_bundle",
]
