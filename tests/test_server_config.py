"""Server configuration precedence and validation (sync_server.config)."""

import json

import pytest

from sync_server.config import ConfigError, load_config


def test_file_then_environment_then_explicit(tmp_path):
    toml = tmp_path / "server.toml"
    toml.write_text('ADMIN_TOKEN = "from-file"\nRATE_LIMIT = 7\nmax_body_bytes = 1000\n')
    env = {"POCKETREC_SERVER_CONFIG": str(toml), "POCKETREC_RATE_LIMIT": "9",
           "POCKETREC_DATA_DIR": str(tmp_path / "d")}
    config = load_config({"MAX_BODY_BYTES": 2000}, environ=env)
    assert config["ADMIN_TOKEN"] == "from-file"
    assert config["RATE_LIMIT"] == 9  # the environment beats the file, and is converted
    assert config["MAX_BODY_BYTES"] == 2000  # the explicit dict beats both
    assert config["DATABASE_URL"] == f"sqlite:///{tmp_path / 'd' / 'pocketrec.db'}"
    assert config["ENROLLMENT_TOKEN"] is None


def test_json_file_and_empty_variables_mean_unset(tmp_path):
    path = tmp_path / "server.json"
    path.write_text(json.dumps({"ENROLLMENT_TOKEN": "join", "DATA_DIR": str(tmp_path)}))
    config = load_config(environ={"POCKETREC_SERVER_CONFIG": str(path),
                                  "POCKETREC_ADMIN_TOKEN": ""})
    assert (config["ENROLLMENT_TOKEN"], config["ADMIN_TOKEN"]) == ("join", None)


@pytest.mark.parametrize("overrides, match", [
    ({"RATE_LIMIT": "many"}, "RATE_LIMIT must be an integer"),
    ({"MAX_BODY_BYTES": 0}, "MAX_BODY_BYTES must be positive"),
    ({"ADMIN_TOKN": "x"}, "unknown setting"),
])
def test_bad_settings_are_refused_by_name(tmp_path, overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config({"DATA_DIR": str(tmp_path), **overrides}, environ={})


def test_unreadable_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="missing.toml"):
        load_config(environ={"POCKETREC_SERVER_CONFIG": str(tmp_path / "missing.toml")})
