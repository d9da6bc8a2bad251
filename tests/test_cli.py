"""The `pocketrec` CLI end to end on the embedded synthetic shop, and its errors."""

import json

import pytest

from trainer.cli import main


def test_demo_end_to_end_beats_popularity(tmp_path, capsys):
    run = tmp_path / "run"
    code = main(["demo", "--run", str(run), "--synthetic-users", "600", "--synthetic-items",
                 "300", "--epochs", "6", "--dim", "32", "--hidden", "32", "--no-progress"])
    assert code == 0
    out = capsys.readouterr().out
    assert "litert int8" in out and "popularity" in out and "line holdout" in out
    rows = {r["model"]: r for r in json.loads((run / "evaluation_test.json").read_text())}
    names = ["dual_encoder torch (float)", "dual_encoder litert float", "dual_encoder litert int8"]
    assert set(rows) == {"popularity", "item-knn", *names}
    torch_row, float_row, int8_row = (rows[n] for n in names)
    assert torch_row["hr@10"] >= 1.5 * rows["popularity"]["hr@10"]
    assert int8_row["agree@10"] >= 0.95
    assert float_row["agree@10"] >= 0.99
    assert torch_row["basket_hr@10"] == "-"  # the synthetic shop has no baskets
    report = json.loads((run / "export_report.json").read_text())
    assert report["int8_bytes"] < report["float_bytes"]
    manifest = json.loads((run / "bundle" / "manifest.json").read_text())
    assert manifest["provenance"]["data"]["name"] == "synthetic"
    assert manifest["privacy"]["epsilon"] is None  # trained without DP


def test_evaluate_without_a_run_says_what_to_do(tmp_path, capsys):
    assert main(["evaluate", "--run", str(tmp_path / "none")]) == 2
    assert "pocketrec train" in capsys.readouterr().err


def test_bad_data_file_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "retail.csv"
    bad.write_text("InvoiceNo,Quantity\n1,2\n")
    assert main(["train", "--run", str(tmp_path / "r"), "--data", str(bad),
                 "--format", "online_retail"]) == 2
    err = capsys.readouterr().err
    assert "lacks column(s)" in err and "StockCode" in err
    assert main(["train", "--run", str(tmp_path / "r"), "--data", str(tmp_path / "nope.csv")]) == 2
    assert "nope.csv" in capsys.readouterr().err


def test_model_flags_an_architecture_lacks_are_refused(tmp_path, capsys):
    assert main(["train", "--run", str(tmp_path / "r"), "--model", "dual_encoder",
                 "--blocks", "3", "--synthetic-users", "50", "--synthetic-items", "30"]) == 2
    assert "--blocks does not apply to --model dual_encoder" in capsys.readouterr().err


def test_dp_flags_need_dp(tmp_path):
    with pytest.raises(SystemExit, match="need --dp"):
        main(["train", "--run", str(tmp_path / "r"), "--noise-multiplier", "1.0",
              "--synthetic-users", "50", "--synthetic-items", "30"])


@pytest.mark.parametrize("command", ["demo", "train", "export", "evaluate"])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "--run" in capsys.readouterr().out
