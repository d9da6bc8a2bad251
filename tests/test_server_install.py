"""The sync server as an operator installs it: ``pip install 'pocketrec[server]'`` into an empty
venv (no torch, no trainer extra), a real round of real devices over HTTP, a DP version
published by writing the round's weights into the base's LiteRT file, which the devices verify
and serve."""

import json
import subprocess
import sys

import numpy as np
import pytest

from device_sdk.bundle import MODEL, load_bundle, run_golden_check
from device_sdk.device_client import DeviceClient
from device_sdk.protocol import SEALED_SCHEME
from tests.support.bundles import zip_bundle
from tests.support.paths import REPO
from tests.support.server import ADMIN, ServerProcess, signing_key_of


@pytest.fixture(scope="module")
def server_python(tmp_path_factory):
    """A fresh venv holding ``pocketrec[server]`` and nothing else (pip, from the registry)."""
    venv = tmp_path_factory.mktemp("server-venv") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                    f"{REPO}[server]"], check=True)
    return python


def importable(python, module):
    # -I: isolated (no PYTHONPATH, no user site, no cwd): only what the venv installed.
    return subprocess.run([str(python), "-I", "-c", f"import {module}"],
                          capture_output=True).returncode == 0


@pytest.mark.slow
def test_the_server_extra_runs_a_dp_round_and_publishes_without_torch(
        server_python, tmp_path, tiny_export, tiny_checkpoint):
    for heavy in ("torch", "opacus", "jax", "transformers", "litert_torch", "ai_edge_quantizer"):
        assert not importable(server_python, heavy), f"{heavy} is installed by the server extra"
    assert importable(server_python, "sync_server.publisher")

    settings = {"ADMIN_TOKEN": ADMIN, "RATE_LIMIT": 1000}  # default PUBLISHER
    with ServerProcess(tmp_path / "server", python=server_python, **settings) as server:
        response = server.admin("POST", "/v1/admin/models", body=zip_bundle(tiny_export.bundle_dir),
                                headers={"Content-Type": "application/zip"})
        assert response.status == 201
        signing_key = signing_key_of(server)
        _, prepared = tiny_checkpoint
        devices = []
        for n in range(3):
            device = DeviceClient(tmp_path / f"device{n}", server_key=signing_key,
                                  server_url=server.url)
            keys_n = [prepared.vocab.keys[i] for i in prepared.split.test.history[n] if i]
            device.log_many([(key, kind, 1000.0 + 3 * j + m) for j, key in enumerate(keys_n)
                             for m, kind in enumerate(("view", "click", "add_to_cart"))])
            assert device.sync(train=False).model_version == 1
            devices.append(device)
        config = {"target_clients": 3, "noise_multiplier": 0.5, "clip_norm": 0.5,
                  "local_epochs": 1, "learning_rate": 0.3, "batch_size": 8,
                  "max_examples": 100, "delta": 1e-5, "upload_scheme": SEALED_SCHEME}
        response = server.admin("POST", "/v1/admin/rounds", json=config)
        assert response.status == 201, response.data
        round_id = json.loads(response.data)["round_id"]
        assert all(d.sync().uploaded for d in devices)
        view = server.round(round_id)
        assert (view["state"], view["published_version"]) == ("published", 2), view
        assert view["epsilon"] > 0

        reports = [d.sync(train=False) for d in devices]
        assert [r.model_version for r in reports] == [2, 2, 2]
        assert all(r.install_error is None for r in reports)
        served = devices[0].models.bundle(2)
        base = load_bundle(tiny_export.bundle_dir)
        assert served.manifest["quantization"]["written_by"] == "tensor_map"
        assert served.manifest["privacy"]["epsilon"] == pytest.approx(view["epsilon"])
        assert served.read(MODEL) != base.read(MODEL)
        assert not all(np.array_equal(served.weights()[k], base.weights()[k])
                       for k in base.weights())
        assert run_golden_check(served.model(), served.manifest["golden"]) == 1.0
        assert len(devices[0].recommend(k=5)) == 5
        for device in devices:
            device.close()
