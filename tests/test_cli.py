"""The `pocketrec` CLI end to end on the embedded synthetic shop, and its errors."""

import json

import pytest

from tests.support.paths import bench_module
from trainer.cli import (
    DEMO_RECIPES,
    DP_STRATEGY_DEFAULTS,
    RECIPE_CLIP_QUANTILE,
    RECIPE_STRATEGY,
    STRATEGY_DEFAULTS,
    build_parser,
    demo_runs,
    main,
)


@pytest.mark.slow
def test_demo_runs_federated_rounds_with_and_without_dp_and_writes_the_report(
        tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    code = main(["demo", "--run", str(run), "--synthetic-users", "300", "--synthetic-items",
                 "150", "--epochs", "2", "--dim", "16", "--hidden", "32", "--max-len", "20",
                 "--rounds", "3", "--clients-per-round", "12", "--no-progress"])
    assert code == 0
    out = capsys.readouterr().out
    report = run / "report"
    assert f"report: {report / 'index.html'}" in out
    data = json.loads((report / "rounds.json").read_text())
    assert set(data["runs"]) == {"federated+DP", "federated"}
    # Each run got the recipe for it: the server optimizer is chosen by DP or not.
    for label, dp in (("federated", False), ("federated+DP", True)):
        config = data["meta"][f"config[{label}]"]
        strategy = RECIPE_STRATEGY[dp]
        assert config["strategy"] == strategy
        settings = {**STRATEGY_DEFAULTS[strategy],
                    **(DP_STRATEGY_DEFAULTS.get(strategy, {}) if dp else {})}
        for key, value in settings.items():
            assert config[key] == value
        assert config["clip_quantile"] == (RECIPE_CLIP_QUANTILE if dp else None)
    assert 0 < data["central"]["hr@10"] <= 1
    for label, records in data["runs"].items():
        assert [r["round"] for r in records] == [0, 1, 2, 3]
        assert [r["state"] for r in records[1:]] == ["published"] * 3, records
        assert records[0]["hr10"] == data["runs"]["federated"][0]["hr10"]  # same start
        epsilons = [r["epsilon"] for r in records]
        if label == "federated+DP":
            assert epsilons[0] == 0 and 0 < epsilons[1] < epsilons[2] < epsilons[3]
        else:
            assert epsilons == [0, 0, 0, 0]
    html = (report / "index.html").read_text()
    for name in ("hr10.png", "online.png", "epsilon.png", "rounds.csv"):
        assert (report / name).stat().st_size > 0
    assert "federated+DP" in html and "central" in html
    assert "federated+DP: HR@10" in out and "federated: HR@10" in out
    # bench/demo_seeds.py --read turns this report into its tables and issue 18's ratios.
    seeds = bench_module("demo_seeds")
    seed, row = seeds.read(run)
    assert seed == data["meta"]["config[federated]"]["seed"]
    summary = {r["run"]: r for r in data["summary"]}
    start, central = summary["federated"]["start_hr10"], data["central"]["hr@10"]
    shares = seeds.ratios(row)
    assert shares["federated / central"] == pytest.approx(
        summary["federated"]["final_hr10"] / central)
    closed = ((summary["federated+DP"]["final_hr10"] - start) / (central - start)
              if central > start else float("nan"))
    assert shares["federated+DP: share of the gap closed"] == pytest.approx(closed, nan_ok=True)
    monkeypatch.setattr("sys.argv", ["demo_seeds.py", "--read", str(run)])
    capsys.readouterr()
    assert seeds.main() == 0
    printed = capsys.readouterr().out
    assert f"| {seed} | {shares['federated / central']:.4f} | " in printed


def _demo(*flags):
    args = build_parser().parse_args(["demo", *flags])
    return args, *demo_runs(args)


def test_the_demo_runs_the_shops_recipe_on_the_shop_and_the_retail_one_on_data():
    simulate = vars(build_parser().parse_args(["simulate"]))
    args, name, runs = _demo()
    assert name == "shop" and args.epochs == DEMO_RECIPES["shop"]["fleet"]["epochs"]
    args, name, runs = _demo("--data", "retail.csv.gz")
    assert name == "retail" and args.epochs == DEMO_RECIPES["retail"]["fleet"]["epochs"]
    assert _demo("--data", "retail.csv.gz", "--recipe", "shop")[1] == "shop"
    for recipe in DEMO_RECIPES:
        args, _, runs = _demo("--recipe", recipe)
        for label, run in runs.items():
            settings = DEMO_RECIPES[recipe][label]
            for key, value in settings.items():
                assert getattr(run, key) == value, (recipe, label, key)
            # What the recipe leaves out is simulate's default.
            for key in ("local_lr", "local_epochs", "local_max_examples", "clip_norm"):
                if key not in settings:
                    assert getattr(run, key) == simulate[key], (recipe, label, key)


def test_flags_given_to_the_demo_win_over_its_recipe():
    recipe = DEMO_RECIPES["retail"]
    args, _, runs = _demo("--data", "r.csv", "--local-lr", "0.05", "--epochs", "3",
                          "--clients-per-round", "50")
    assert args.epochs == 3
    for label, run in runs.items():
        assert run.local_lr == 0.05 and run.clients_per_round == 50
        assert run.rounds == recipe[label]["rounds"]  # the rest stays the recipe's
        assert run.local_max_examples == recipe[label]["local_max_examples"]
    # --rounds replaces the recipe's clock with a clock of those rounds.
    _, _, runs = _demo("--data", "r.csv", "--rounds", "10")
    assert runs["federated"].rounds == 10 and runs["federated"].clock_rounds is None
    # --strategy replaces the server optimizer of both runs, --dp-strategy the DP run's.
    _, _, runs = _demo("--data", "r.csv", "--strategy", "fedavg")
    for run in runs.values():
        assert run.strategy == "fedavg" and run.server_lr is None and run.momentum is None
    _, _, runs = _demo("--data", "r.csv", "--dp-strategy", "fedadam")
    assert runs["federated+DP"].momentum is None and runs["federated+DP"].server_lr is None
    assert runs["federated"].strategy == recipe["federated"]["strategy"]
    assert runs["federated"].tau == recipe["federated"]["tau"]
    # A noise flag replaces the recipe's target epsilon.
    _, _, runs = _demo("--data", "r.csv", "--noise-multiplier", "0.7")
    assert runs["federated+DP"].target_epsilon is None
    assert runs["federated+DP"].noise_multiplier == 0.7
    _, _, runs = _demo("--noise-multiplier", "0.7")
    assert runs["federated+DP"].noise_multiplier == 0.7
    # The recipe's federated tensors are its model's: another model needs its own.
    with pytest.raises(ValueError, match="--recipe retail federates tensors of repeat_sasrec, "
                       "not of dual_encoder: give --trainable, or --recipe shop"):
        _demo("--data", "r.csv", "--model", "dual_encoder")
    _, _, runs = _demo("--data", "r.csv", "--model", "dual_encoder", "--trainable", "all")
    assert runs["federated+DP"].trainable == "all"
    assert _demo("--data", "r.csv", "--model", "dual_encoder", "--recipe", "shop")[1] == "shop"


@pytest.mark.slow
def test_the_retail_recipe_demo_gives_each_run_its_own_settings_in_fast_mode(tmp_path, capsys):
    run = tmp_path / "run"
    recipe = DEMO_RECIPES["retail"]
    code = main(["demo", "--recipe", "retail", "--mode", "fast", "--run", str(run),
                 "--synthetic-users", "300", "--synthetic-items", "150", "--epochs", "2",
                 "--dim", "16", "--hidden", "32", "--max-len", "20", "--rounds", "3",
                 "--clients-per-round", "24", "--no-progress"])
    assert code == 0
    out = capsys.readouterr().out
    assert "recipe retail:" in out
    data = json.loads((run / "report" / "rounds.json").read_text())
    for label in ("federated", "federated+DP"):
        config = data["meta"][f"config[{label}]"]
        settings = {"federated+DP": {"strategy", "server_lr", "momentum", "clip_norm",
                                     "clip_quantile", "target_epsilon"},
                    "federated": {"strategy", "server_lr", "tau", "local_epochs",
                                  "clip_norm", "serve_ema"}}[label]
        for key in settings:
            assert config[key] == recipe[label][key], (label, key)
        assert config["learning_rate"] == recipe[label]["local_lr"]
        assert config["max_examples"] == recipe[label]["local_max_examples"]
        records = data["runs"][label]
        assert [r["state"] for r in records[1:]] == ["published"] * 3
    dp = data["meta"]["config[federated+DP]"]
    assert dp["noise_multiplier"] > 0 and len(dp["trainable"]) < len(
        data["meta"]["config[federated]"]["trainable"])
    assert 0 < data["runs"]["federated+DP"][-1]["epsilon"] <= recipe["federated+DP"][
        "target_epsilon"]
    assert data["meta"]["config[federated]"]["batch_size"] == recipe["federated"][
        "local_batch_size"]


@pytest.mark.slow
def test_train_export_evaluate_end_to_end_beats_popularity(tmp_path, capsys):
    run = tmp_path / "run"
    common = ["--run", str(run)]
    assert main(["train", *common, "--model", "dual_encoder", "--synthetic-users", "600",
                 "--synthetic-items", "300",
                 "--epochs", "6", "--dim", "32", "--hidden", "32", "--no-progress"]) == 0
    assert main(["export", *common]) == 0
    assert main(["evaluate", *common]) == 0
    out = capsys.readouterr().out
    assert "litert int8" in out and "popularity" in out and "line holdout" in out
    rows = {r["model"]: r for r in json.loads((run / "evaluation_test.json").read_text())}
    names = ["dual_encoder torch (float)", "dual_encoder litert float", "dual_encoder litert int8"]
    assert set(rows) == {"popularity", "item-knn", "personal popularity", "recency item-knn",
                         "tifu-knn", *names}
    assert "tifu-knn, line protocol (validation" in out  # the grid validation scored
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


@pytest.mark.parametrize("command", ["simulate", "demo"])
def test_rounds_take_a_noise_multiplier_or_a_target_epsilon(command, tmp_path, capsys):
    common = ["--run", str(tmp_path / "r"), "--synthetic-users", "50", "--synthetic-items",
              "30"]
    assert main([command, *common, "--noise-multiplier", "0.9", "--target-epsilon", "4"]) == 2
    assert "not both" in capsys.readouterr().err
    assert main([command, *common, "--target-epsilon", "-1"]) == 2
    assert "--target-epsilon must be positive" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()  # refused before any work


@pytest.mark.parametrize("command", ["demo", "train", "export", "evaluate"])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "--run" in capsys.readouterr().out
