"""Integration on the real UCI Online Retail log: the `pocketrec` console script trains,
exports (signed) and evaluates; the dual encoder beats popularity and int8 LiteRT agrees with
torch; `--model sasrec` trains, exports and shares one evaluation table with it under both
protocols. Then the device example app runs in a fresh venv holding only `pocketrec[device]`."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from device_sdk.files import load_or_create_ed25519
from tests.support.bundles import resign_bundle
from tests.support.paths import ONLINE_RETAIL, REPO

pytestmark = pytest.mark.slow  # trains and exports on the real data set


def _pocketrec(*args: str) -> str:
    exe = Path(sys.executable).with_name("pocketrec")  # the console script pip installed
    assert exe.is_file(), f"the pocketrec console script is not installed at {exe}"
    # This checkout's packages first, whichever checkout the script was installed from.
    path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path}
    done = subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=1800,
                          env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.fixture(scope="module")
def retail_run(tmp_path_factory):
    assert ONLINE_RETAIL.is_file(), f"real data expected at {ONLINE_RETAIL}"
    root = tmp_path_factory.mktemp("retail")
    run = root / "run"
    out = _pocketrec("train", "--model", "dual_encoder", "--data", str(ONLINE_RETAIL), "--run",
                     str(run), "--epochs", "3",
                     "--batch-size", "1024", "--no-progress")
    assert "4,3" in out  # ~4,3xx customers after cleaning
    key = root / "keys" / "server.key"
    out = _pocketrec("export", "--run", str(run), "--signing-key", str(key))
    public_hex = out.split("devices pin public key ")[1].split()[0]
    return run, key, public_hex


@pytest.fixture(scope="module")
def retail_table(retail_run, tmp_path_factory):
    """`pocketrec train --model sasrec` (two short epochs: a smoke run, not the benchmark;
    bench/ and the README hold the measured numbers) + `export`, then one `evaluate
    --compare` of both runs: the table both tests below read (one evaluation, whose
    baselines' tuning is most of its cost, instead of one per model)."""
    dual, _, _ = retail_run
    run = tmp_path_factory.mktemp("retail-sasrec") / "sasrec"
    out = _pocketrec("train", "--model", "sasrec", "--data", str(ONLINE_RETAIL), "--run",
                     str(run), "--epochs", "2", "--no-progress")
    assert "basket holdout" in out
    _pocketrec("export", "--run", str(run))
    table = _pocketrec("evaluate", "--run", str(run), "--compare", str(dual))
    rows = {r["model"]: r for r in json.loads((run / "evaluation_test.json").read_text())}
    return run, table, rows


def test_train_export_evaluate_on_online_retail(retail_run, retail_table):
    run, _, _ = retail_run
    report = json.loads((run / "export_report.json").read_text())
    assert report["agree@10_int8_vs_torch"] >= 0.97
    assert report["size_ratio_int8_float"] < 0.4
    _, table, rows = retail_table
    assert "dual_encoder litert int8" in table and "basket holdout" in table
    torch_row, int8_row = rows["dual_encoder torch (float)"], rows["dual_encoder litert int8"]
    assert torch_row["hr@10"] > 2 * rows["popularity"]["hr@10"]
    assert int8_row["hr@10"] > 2 * rows["popularity"]["hr@10"]
    assert int8_row["agree@10"] >= 0.97  # against its own run's torch model
    assert torch_row["coverage@10"] > 10 * rows["popularity"]["coverage@10"]
    assert torch_row["basket_hr@10"] > rows["popularity"]["basket_hr@10"]


def test_sasrec_trains_exports_and_shares_one_table_with_the_dual_encoder(retail_table):
    """`--model sasrec` trains, exports and shares one evaluate table with the dual encoder:
    both protocols, the baselines and both models."""
    run, table, rows = retail_table
    report = json.loads((run / "export_report.json").read_text())
    assert report["agree@10_int8_vs_torch"] >= 0.9
    for name in ("popularity", "item-knn", "sasrec litert int8", "dual_encoder litert int8",
                 "basket_recall@10"):
        assert name in table
    sas = rows["sasrec litert int8"]
    assert sas["hr@10"] > 2 * rows["popularity"]["hr@10"]
    assert sas["hr@10"] >= 0.95 * rows["sasrec torch (float)"]["hr@10"]
    assert 0 < sas["basket_recall@10"] <= sas["basket_hr@10"] <= 1


def test_device_app_with_only_the_device_extra(retail_run, tmp_path):
    """`pip install .[device]` into an empty venv, then the example app on a real customer:
    log, recommend, install a newer signed bundle, refuse tampered + older, train locally."""
    run, key_path, public_hex = retail_run
    newer = resign_bundle(run / "bundle", tmp_path / "v2", load_or_create_ed25519(key_path),
                          model_version=2, parent_version=1)
    venv = tmp_path / "device-venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", f"{REPO}[device]"],
                         capture_output=True, text=True, timeout=900)
    assert pip.returncode == 0, pip.stderr[-3000:]
    heavy = ["flask", "sqlalchemy", "torch", "tensorflow", "jax", "pandas", "opacus"]
    for module in heavy:  # the device venv really lacks them, so the app cannot use them
        probe = subprocess.run([str(venv / "bin" / "python"), "-c", f"import {module}"],
                               capture_output=True)
        assert probe.returncode != 0, f"{module} is importable in the device-only venv"
    done = subprocess.run(
        [str(venv / "bin" / "python"), str(REPO / "examples" / "device_app.py"),
         "--data", str(ONLINE_RETAIL), "--bundle", str(run / "bundle"), "--newer", str(newer),
         "--server-key", public_hex, "--device-dir", str(tmp_path / "device")],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "installed model v1" in out and "installed model v2" in out
    assert "refused tampered bundle: bundle_integrity" in out
    assert "refused older bundle: stale_version" in out
    assert "serving model v2: 10 items" in out
    logged = int(out.split("logged ")[1].split()[0])
    examples = int(out.split("local training: ")[1].split()[0])
    assert logged > 1000 and 0 < examples < logged
    clipped = float(out.split("clipped to ")[1].split()[0])
    assert 0 < clipped <= 1.0  # the example clips to norm 1.0
