"""The suite's fixtures; what tests share besides fixtures is in tests/support."""

import numpy as np
import pytest

from tests.support.bundles import resign_bundle
from tests.support.postgres import REQUIRE_POSTGRES, PostgresServer, find_bindir
from tests.support.server import make_device


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
def tiny_sasrec_checkpoint():
    """A small SASRec-style model (2 blocks) trained for three epochs on the same shop."""
    import model_zoo
    from trainer.checkpoint import Checkpoint
    from trainer.data.dataset import DataSpec, prepare
    from trainer.train import TrainConfig, train

    spec = DataSpec(synthetic_users=300, synthetic_items=120, seed=7)
    prepared = prepare(spec, max_len=12)
    arch = model_zoo.get("sasrec")
    config = arch.config(n_items=len(prepared.vocab), dim=16, hidden=32, blocks=2, heads=2,
                         max_len=12, top_k=20, dropout=0.1)
    module = arch.torch_module(config)
    result = train(module, prepared.split, TrainConfig(epochs=3, batch_size=32, lr=1e-2),
                   progress=False)
    ckpt = Checkpoint("sasrec", config.to_dict(), result.params, prepared.vocab,
                      {"data": spec.to_dict()})
    return ckpt, prepared


@pytest.fixture(scope="session")
def tiny_sasrec_export(tiny_sasrec_checkpoint, tmp_path_factory):
    """The tiny SASRec checkpoint through the real litert-torch + ai-edge-quantizer export."""
    from trainer.export import export_bundle

    ckpt, prepared = tiny_sasrec_checkpoint
    out = tmp_path_factory.mktemp("export-sasrec")
    return export_bundle(ckpt, out, histories=prepared.split.test.history[:3])


@pytest.fixture(scope="session")
def tiny_export(tiny_checkpoint, tmp_path_factory):
    """The tiny checkpoint exported through the real litert-torch + ai-edge-quantizer."""
    from trainer.export import export_bundle

    ckpt, prepared = tiny_checkpoint
    out = tmp_path_factory.mktemp("export")
    return export_bundle(ckpt, out, histories=prepared.split.test.history[:3])


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture(scope="session")
def server_key():
    """The publisher's Ed25519 key; devices pin its public half."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    return Ed25519PrivateKey.generate()


@pytest.fixture(scope="session")
def signed_bundles(tiny_export, server_key, tmp_path_factory):
    """version -> signed bundle directory of the tiny export, for versions 1..3."""
    root = tmp_path_factory.mktemp("signed")
    return {
        v: resign_bundle(tiny_export.bundle_dir, root / f"v{v}", server_key, model_version=v,
                         parent_version=v - 1 or None)
        for v in (1, 2, 3)
    }


# -- databases: every server integration test runs on SQLite and on a real PostgreSQL ----------

@pytest.fixture(scope="session")
def postgres():
    """One private PostgreSQL server for the session (tests/support/postgres.py). Missing
    binaries skip the PostgreSQL half locally and fail it in CI (POCKETREC_REQUIRE_POSTGRES=1)."""
    if find_bindir() is None:
        message = "PostgreSQL server binaries not installed (apt-get install postgresql)"
        if REQUIRE_POSTGRES:
            pytest.fail(message)
        pytest.skip(message)
    with PostgresServer() as pg:
        yield pg


def _db_settings(request) -> dict[str, str]:
    if request.param == "sqlite":
        return {}
    return {"DATABASE_URL": request.getfixturevalue("postgres").create_database()}


@pytest.fixture(params=["sqlite", "postgresql"])
def db_settings(request) -> dict[str, str]:
    """Server settings choosing the database: {} (SQLite in DATA_DIR, the default) or
    {"DATABASE_URL": <a fresh PostgreSQL database>}. Pass them to ServerProcess/create_app;
    a restarted server given the same settings finds the same database."""
    return _db_settings(request)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def module_db_settings(request) -> dict[str, str]:
    """``db_settings`` for a server shared by a module's tests."""
    return _db_settings(request)


@pytest.fixture
def devices(server, tmp_path, tiny_checkpoint):
    """Three DeviceClients with shopping histories (test users 0-2) on the module's ``server``
    fixture, registered and holding its version 1."""
    made = [make_device(server, tmp_path / f"device{n}", tiny_checkpoint, n) for n in range(3)]
    for device in made:
        report = device.sync(train=False)  # registers and installs version 1
        assert report.model_version == 1
    yield made
    for device in made:
        device.close()


# -- the `slow` marker: `pytest -m "not slow"` leaves out every test that trains or exports ----

# A test using one of these fixtures trains or exports a real model (once per session).
MODEL_FIXTURES = frozenset({"tiny_checkpoint", "tiny_export", "tiny_sasrec_checkpoint",
                            "tiny_sasrec_export", "signed_bundles"})


# -- two workers (pyproject: -n 2 --dist loadfile --no-loadscope-reorder): xdist hands out
# whole files in collection order, so the files that take minutes go first; one of them
# started last would run alone at the end while the other worker idles.
FIRST = ("test_online_retail.py", "test_secagg_rounds.py", "test_server_faults.py",
         "test_selection.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if MODEL_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
    # A stable sort: every file keeps its own order of tests.
    items.sort(key=lambda item: FIRST.index(item.path.name) if item.path.name in FIRST
               else len(FIRST))
