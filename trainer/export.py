"""Checkpoint -> LiteRT bundle: litert-torch converts the serving graph to float .tflite,
ai-edge-quantizer makes the weights int8 (dynamic range: activations stay float, which keeps
ranking intact where full-integer quantization collapses scores), the bundle records a golden
check computed by the real LiteRT interpreter."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from device_sdk.bundle import ITEMS, MODEL, WEIGHTS, make_golden, save_weights, write_bundle
from device_sdk.topk_model import TopKModel
from trainer.checkpoint import Checkpoint

FLOAT_MODEL = "model_float.tflite"
# Measured repeat rate (share of next items already in the history) from which devices keep
# purchased items in their results and feed the model its raw history, repeats included.
REPEAT_KEEP = 0.1
RECIPES = ("dynamic_wi8_afp32", "weight_only_wi8_afp32")


@dataclass
class ExportResult:
    bundle_dir: Path
    float_path: Path
    float_bytes: int
    int8_bytes: int
    seconds: float
    manifest: dict[str, Any]


def convert_float(ckpt: Checkpoint) -> bytes:
    """The serving graph (top-K inside) as float .tflite bytes."""
    import litert_torch
    import torch
    from litert_torch import progress

    from model_zoo.serving import INPUT_NAME, TopKServing

    # litert-torch prints every conversion stage through a rich console; keep output readable.
    progress.console.quiet = True

    config = ckpt.model_config()
    serving = TopKServing(ckpt.torch_module(), config.top_k).eval()
    sample = torch.zeros((1, config.max_len), dtype=torch.int32)
    return bytes(litert_torch.convert(serving, sample_kwargs={INPUT_NAME: sample}).model_content())


def quantize(float_model: bytes, recipe_name: str = "dynamic_wi8_afp32") -> bytes:
    from ai_edge_quantizer import quantizer, recipe

    if recipe_name not in RECIPES:
        raise ValueError(f"recipe must be one of {RECIPES}, got {recipe_name!r}")
    q = quantizer.Quantizer(float_model, getattr(recipe, recipe_name)())
    return bytes(q.quantize(enable_progress_report=False).quantized_model)


def golden_histories(ckpt: Checkpoint, histories: np.ndarray | None, n: int = 4) -> np.ndarray:
    """Real held-out histories when given; else histories of popular items (and an empty one)."""
    max_len = ckpt.model_config().max_len
    if histories is not None and len(histories):
        return np.asarray(histories[:n], dtype=np.int32)
    popular = ckpt.vocab.popular or list(range(1, len(ckpt.vocab)))
    rows = np.zeros((n, max_len), dtype=np.int32)
    for row in range(1, n):
        picks = popular[row - 1 :: n][: max_len]
        rows[row, max_len - len(picks) :] = picks
    return rows


def history_policy(data: dict[str, Any]) -> dict[str, Any] | None:
    """The devices' history policy for a model trained on ``data`` (the checkpoint's data
    stats), or None for data without a measured repeat rate (older runs: the SDK's default).
    Where people buy again, dropping purchased items would remove the best candidates."""
    rate = data.get("repeat_rate")
    if rate is None:
        return None
    repeats = rate >= REPEAT_KEEP
    return {"exclude_kinds": ["dismiss"] if repeats else ["purchase", "dismiss"],
            "distinct": not repeats, "repeat_rate": rate}


def export_bundle(
    ckpt: Checkpoint,
    out_dir: str | Path,
    *,
    model_version: int = 1,
    parent_version: int | None = None,
    recipe_name: str = "dynamic_wi8_afp32",
    histories: np.ndarray | None = None,
    signer: Callable[[bytes], bytes] | None = None,
) -> ExportResult:
    """Write ``out_dir/bundle/`` (the publishable bundle) and ``out_dir/model_float.tflite``
    (kept beside it for evaluation only)."""
    started = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    float_model = convert_float(ckpt)
    int8_model = quantize(float_model, recipe_name)
    (out_dir / FLOAT_MODEL).write_bytes(float_model)
    golden = make_golden(TopKModel(int8_model), golden_histories(ckpt, histories))
    training = ckpt.meta.get("training", {})
    privacy = ckpt.meta.get("privacy") or {}
    manifest = {
        "model_version": model_version,
        "parent_version": parent_version,
        # "federated": the tensors rounds should train (a round's default `trainable`).
        "architecture": {"name": ckpt.architecture, "config": ckpt.config,
                         "federated": list(ckpt.model_config().federated_params())},
        "items_digest": ckpt.vocab.digest(),
        "quantization": {"recipe": recipe_name, "tool": "ai-edge-quantizer"},
        "provenance": {
            "data": ckpt.meta.get("data", {}),
            "training": training,
            "rounds": 0,
            "clip_norm": privacy.get("max_grad_norm"),
            "noise_multiplier": privacy.get("noise_multiplier"),
        },
        "privacy": {
            "epsilon": privacy.get("epsilon"),
            "delta": privacy.get("delta"),
            "unit": privacy.get("unit"),
            "accountant": privacy.get("accountant"),
        },
        "golden": golden,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    policy = history_policy(ckpt.meta.get("data", {}))
    if policy is not None:
        manifest["history_policy"] = policy
    files = {MODEL: int8_model, WEIGHTS: save_weights(ckpt.params), ITEMS: ckpt.vocab.to_json()}
    bundle_dir = write_bundle(out_dir / "bundle", files, manifest, signer=signer)
    return ExportResult(
        bundle_dir=bundle_dir,
        float_path=out_dir / FLOAT_MODEL,
        float_bytes=len(float_model),
        int8_bytes=len(int8_model),
        seconds=time.perf_counter() - started,
        manifest=manifest,
    )
