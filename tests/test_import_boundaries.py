"""The device SDK and model_zoo's numpy side stay light: no torch, flask, sqlalchemy, tf, jax."""

import subprocess
import sys

import pytest

HEAVY = {"flask", "sqlalchemy", "torch", "tensorflow", "jax", "pandas", "opacus", "litert_torch"}


@pytest.mark.parametrize("module", ["device_sdk", "model_zoo", "device_sdk.bundle"])
def test_light_imports(module):
    code = (
        f"import sys, {module}\n"
        "print(','.join(sorted({m.split('.')[0] for m in sys.modules})))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = set(out.stdout.strip().split(","))
    assert module.split(".")[0] in loaded
    assert not loaded & HEAVY, f"import {module} pulled in {sorted(loaded & HEAVY)}"


def test_sync_server_never_imports_trainer_or_torch():
    """The server reaches the exporter only through the PUBLISHER name, on first use."""
    code = (
        "import sys, sync_server, sync_server.rounds, sync_server.api.admin\n"
        "import sync_server.publisher\n"
        "print(','.join(sorted({m.split('.')[0] for m in sys.modules})))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = set(out.stdout.strip().split(","))
    assert "sync_server" in loaded
    assert not loaded & {"trainer", "torch", "litert_torch", "opacus"}, sorted(loaded)


@pytest.mark.parametrize("accountant", ["pld", "rdp"])
def test_the_privacy_ledger_computes_without_torch_or_opacus(accountant):
    """The ledger's engine is dp_accounting (pure Python): an epsilon computed in a fresh
    process loads neither torch nor opacus."""
    code = (
        "import sys\n"
        "from sync_server.privacy import LedgerEntry, PrivacyLedger\n"
        f"ledger = PrivacyLedger(1e-5, accountant={accountant!r})\n"
        "assert ledger.record(LedgerEntry('r1', 1.0, 0.01)) > 0\n"
        "print(','.join(sorted({m.split('.')[0] for m in sys.modules})))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = set(out.stdout.strip().split(","))
    assert "dp_accounting" in loaded
    assert not loaded & {"torch", "opacus", "trainer"}, sorted(loaded & {"torch", "opacus"})


def test_the_delta_rule_imports_without_flask_or_sqlalchemy():
    """``trainer.train`` shares the server's delta rule: importing it loads no web stack."""
    code = (
        "import sys\n"
        "from sync_server.privacy import default_delta\n"
        "assert default_delta(1900) == 1e-5\n"
        "print(','.join(sorted({m.split('.')[0] for m in sys.modules})))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = set(out.stdout.strip().split(","))
    assert not loaded & {"flask", "sqlalchemy", "torch"}, sorted(loaded)
