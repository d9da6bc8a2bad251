"""The server's default publisher: a round's new float weights -> a bundle, in milliseconds.

``patch_or_export`` (the ``PUBLISHER`` default) writes the new weights into the base version's
LiteRT file (``model_zoo.tensor_map``: numpy and the flatbuffer schema inside ai-edge-litert,
no torch), recomputes the golden check with the real LiteRT interpreter on the base's golden
histories, and writes a new unsigned bundle beside the base; the round service then fills in
provenance and privacy and signs it (``sync_server.rounds``).

When the base cannot be patched safely (an architecture without serving constants, a file the
tensor map refuses, a parameter whose shape changed) it falls back to the full export,
``trainer.publish:export_weights``, which needs the ``trainer`` extra (torch). A server
installed with the ``server`` extra alone then fails that round with an error naming why."""

from __future__ import annotations

import importlib
import json
import logging
import tempfile
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

import model_zoo
from device_sdk.bundle import (
    MANIFEST,
    MODEL,
    WEIGHTS,
    encode_manifest,
    file_entry,
    load_bundle,
    make_golden,
    save_weights,
    write_bundle,
)
from device_sdk.topk_model import TopKModel
from model_zoo.tensor_map import Unpatchable, patch_weights

log = logging.getLogger(__name__)

FULL_EXPORT = "trainer.publish:export_weights"


def served_average(decay: float, served: Mapping[str, np.ndarray],
                   weights: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The served model of a version under ``serve_ema`` (``sync_server.round_config``):
    decay x the base version's served tensors + (1 - decay) x the new weights, tensor by
    tensor (float64 math, float32 out). The server's publishing and the fast simulator
    both call this."""
    return {name: (decay * np.asarray(served[name], np.float64)
                   + (1 - decay) * np.asarray(value, np.float64)).astype(np.float32)
            for name, value in weights.items()}


def _over(base_params: Mapping[str, np.ndarray],
          weights: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The base's tensors with ``weights`` written over them; Unpatchable for a name or
    shape the base's graph does not have."""
    params = dict(base_params)
    for name, value in weights.items():
        value = np.asarray(value, np.float32)
        if name not in base_params or base_params[name].shape != value.shape:
            raise Unpatchable(f"parameter {name!r} {value.shape} is not in the base's graph "
                              f"({base_params.get(name, np.zeros(0)).shape})")
        params[name] = value
    return params


def patch_bundle(
    weights: Mapping[str, np.ndarray], base_bundle_dir: Path, version: int,
    provenance: Mapping[str, Any], *, served: Mapping[str, np.ndarray] | None = None,
    base_served: Mapping[str, np.ndarray] | None = None,
) -> Path:
    """A publisher (``sync_server.publishing.Publisher``) that patches the base's model file.
    Raises ``Unpatchable`` when it cannot; ``patch_or_export`` then re-exports.

    ``served``: the tensors the model file serves when they are not ``weights`` (a served
    average); weights.npz still carries ``weights``. ``base_served``: those the base's model
    file was written from when they were not its weights.npz (the patch finds the base's
    tensors in the file by their values)."""
    base = load_bundle(base_bundle_dir)
    arch = model_zoo.get(base.architecture)
    if arch.serving_constants is None:
        raise Unpatchable(f"architecture {base.architecture!r} declares no serving constants")
    base_params = base.weights()
    new_params = _over(base_params, weights)
    model = patch_weights(base.read(MODEL), arch.serving_constants,
                          arch.config_from_dict(base.config),
                          base_params if base_served is None else _over(base_params,
                                                                        base_served),
                          new_params if served is None else _over(base_params, served))
    golden = base.manifest.get("golden") or {}
    histories = np.asarray(golden.get("histories", []), np.int32)
    files = {name: base.read(name) for name in base.manifest["files"]}
    files[MODEL] = model
    files[WEIGHTS] = save_weights(new_params)
    manifest = {k: v for k, v in base.manifest.items() if k not in ("files", "format_version")}
    manifest.update(
        model_version=version,
        parent_version=base.version,
        provenance={**manifest.get("provenance", {}), **provenance},
        quantization={**(manifest.get("quantization") or {}), "written_by": "tensor_map"},
        created=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    if len(histories):
        manifest["golden"] = make_golden(
            TopKModel(model), histories, k=int(golden.get("k", 10)),
            min_overlap=float(golden.get("min_overlap", 0.8)))
    out = Path(tempfile.mkdtemp(prefix=f"patch-v{version}-", dir=Path(base_bundle_dir).parent))
    return write_bundle(out / "bundle", files, manifest)


def patch_or_export(
    weights: Mapping[str, np.ndarray], base_bundle_dir: Path, version: int,
    provenance: Mapping[str, Any], *, served: Mapping[str, np.ndarray] | None = None,
    base_served: Mapping[str, np.ndarray] | None = None,
) -> Path:
    """``patch_bundle``, or the full export when the base cannot be patched (of ``served``
    when given, with ``weights`` then written into the new bundle's weights.npz)."""
    try:
        return patch_bundle(weights, base_bundle_dir, version, provenance, served=served,
                            base_served=base_served)
    except Unpatchable as exc:
        why = str(exc)
    module, _, name = FULL_EXPORT.partition(":")
    try:
        export = getattr(importlib.import_module(module), name)
    except ImportError as exc:
        raise RuntimeError(
            f"version {version} cannot be written into the base's model file ({why}) and the "
            f"full export needs the trainer extra (pip install 'pocketrec[trainer]'): {exc}"
        ) from None
    log.info("publishing version %d by full export: %s", version, why,
             extra={"version": version, "publisher": "export"})
    if served is None:
        return export(weights, base_bundle_dir, version, provenance)
    out = Path(export(served, base_bundle_dir, version, provenance))
    params = {**load_bundle(base_bundle_dir).weights(),
              **{k: np.asarray(v, np.float32) for k, v in weights.items()}}
    data = save_weights(params)
    (out / WEIGHTS).write_bytes(data)
    manifest = json.loads((out / MANIFEST).read_bytes())
    manifest["files"][WEIGHTS] = file_entry(data)
    (out / MANIFEST).write_bytes(encode_manifest(manifest))
    return out
