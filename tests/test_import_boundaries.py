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
