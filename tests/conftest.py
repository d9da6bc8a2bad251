from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
ONLINE_RETAIL = REPO.parent / "shared" / "data" / "online_retail.csv.gz"


@pytest.fixture(scope="session")
def tiny_checkpoint():
    """A small dual encoder trained for two epochs on a small synthetic shop."""
    import model_zoo
    from trainer.checkpoint import Checkpoint
    from trainer.data.dataset import DataSpec, prepare
    from trainer.train import TrainConfig, train

    spec = DataSpec(synthetic_users=300, synthetic_items=120, seed=7)
    prepared = prepare(spec, max_len=12)
    arch = model_zoo.get("dual_encoder")
    config = arch.config(n_items=len(prepared.vocab), dim=16, hidden=16, max_len=12, top_k=20)
    module = arch.torch_module(config)
    result = train(module, prepared.split, TrainConfig(epochs=2, batch_size=256), progress=False)
    ckpt = Checkpoint("dual_encoder", config.to_dict(), result.params, prepared.vocab,
                      {"data": spec.to_dict()})
    return ckpt, prepared


@pytest.fixture(scope="session")
def tiny_export(tiny_checkpoint, tmp_path_factory):
    """The tiny checkpoint exported through the real litert-torch + ai-edge-quantizer."""
    from trainer.export import export_bundle

    ckpt, prepared = tiny_checkpoint
    out = tmp_path_factory.mktemp("export")
    return export_bundle(ckpt, out, histories=prepared.split.test.history[:3])


def copy_bundle(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


@pytest.fixture
def rng():
    return np.random.default_rng(0)
