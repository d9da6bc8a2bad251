"""The sync server's real publisher: a round's new float weights -> a freshly exported bundle.

``export_weights`` matches ``sync_server.publishing.Publisher``. The server's default publisher
(``sync_server.publisher:patch_or_export``) writes new weights into the base's LiteRT file
and imports this by name only when a base cannot be patched, so sync_server itself never
imports trainer (nor torch)."""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from device_sdk.bundle import load_bundle
from trainer.checkpoint import Checkpoint
from trainer.export import RECIPES, export_bundle


def export_weights(
    weights: Mapping[str, np.ndarray], base_bundle_dir: Path, version: int,
    provenance: Mapping[str, Any],
) -> Path:
    """Load ``weights`` (over the base bundle's, for parameters a round did not train) into
    the architecture's torch module and run the real export (litert-torch, the base's
    quantization recipe, a golden check on the base's golden histories). Returns the new,
    unsigned bundle directory beside ``base_bundle_dir``."""
    base = load_bundle(base_bundle_dir)
    params = {**base.weights(), **{k: np.asarray(v, np.float32) for k, v in weights.items()}}
    meta = {k: v for k, v in (base.manifest.get("provenance") or {}).items()
            if k in ("data", "training")}
    ckpt = Checkpoint(base.architecture, base.config, params, base.items(), meta)
    recipe = (base.manifest.get("quantization") or {}).get("recipe")
    histories = (base.manifest.get("golden") or {}).get("histories")
    out = Path(tempfile.mkdtemp(prefix=f"export-v{version}-", dir=Path(base_bundle_dir).parent))
    result = export_bundle(
        ckpt, out, model_version=version, parent_version=base.version,
        recipe_name=recipe if recipe in RECIPES else RECIPES[0],
        histories=None if histories is None else np.asarray(histories, np.int32),
    )
    # The server sets provenance and privacy in the manifest itself; nothing more here.
    return result.bundle_dir
