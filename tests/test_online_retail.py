"""Integration on the real UCI Online Retail log: the `pocketrec` console script trains,
exports and evaluates; the dual encoder beats popularity and int8 LiteRT agrees with torch."""

import json
import subprocess
import sys
from pathlib import Path

from conftest import ONLINE_RETAIL


def _pocketrec(*args: str) -> str:
    exe = Path(sys.executable).with_name("pocketrec")  # the console script pip installed
    assert exe.is_file(), f"the pocketrec console script is not installed at {exe}"
    done = subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_train_export_evaluate_on_online_retail(tmp_path):
    assert ONLINE_RETAIL.is_file(), f"real data expected at {ONLINE_RETAIL}"
    run = str(tmp_path / "retail")
    out = _pocketrec("train", "--data", str(ONLINE_RETAIL), "--run", run, "--epochs", "3",
                     "--batch-size", "1024", "--no-progress")
    assert "4,3" in out  # ~4,3xx customers after cleaning
    _pocketrec("export", "--run", run)
    report = json.loads((tmp_path / "retail" / "export_report.json").read_text())
    assert report["agree@10_int8_vs_torch"] >= 0.97
    assert report["size_ratio_int8_float"] < 0.4
    table = _pocketrec("evaluate", "--run", run)
    assert "litert int8" in table
    rows = {r["model"]: r for r in json.loads((tmp_path / "retail" / "evaluation_test.json")
                                              .read_text())}
    assert rows["torch (float)"]["hr@10"] > 2 * rows["popularity"]["hr@10"]
    assert rows["litert int8"]["hr@10"] > 2 * rows["popularity"]["hr@10"]
    assert rows["litert int8"]["agree@10"] >= 0.97
    assert rows["torch (float)"]["coverage@10"] > 10 * rows["popularity"]["coverage@10"]
