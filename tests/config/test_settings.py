"""Settings: TOML file, TELEHEALTH_* overrides, and errors that name key, value and expectation."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from config.settings import ConfigError, load_settings

REPO = Path(__file__).resolve().parents[2]


def test_defaults_are_the_embedded_ones() -> None:
    settings = load_settings(None)
    assert settings.server.host == "127.0.0.1" and settings.server.port == 8080
    assert settings.live.backend == "memory"
    assert settings.queue.escalate_after_s["stat"] < settings.queue.escalate_after_s["routine"]


def test_the_shipped_example_is_valid() -> None:
    settings = load_settings(REPO / "config" / "example.toml")
    assert settings.server.port == 8080
    assert settings.queue.escalate_after_s["stat"] == 60


def test_environment_overrides_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "t.toml"
    path.write_text("[server]\nport = 9000\n[queue]\ntick_s = 2\n")
    monkeypatch.setenv("TELEHEALTH_SERVER__PORT", "9100")
    settings = load_settings(path)
    assert settings.server.port == 9100
    assert settings.queue.tick_s == 2


@pytest.mark.parametrize(("text", "expected"), [
    ("[server]\nport = 'eighty'\n", ["server.port", "'eighty'", "integer"]),
    ("[server]\nport = 70000\n", ["server.port", "70000", "less than or equal to 65535"]),
    ("[queue]\nescalate_after_s = { stat = -1 }\n", ["queue.escalate_after_s", "stat", "> 0"]),
    ("[queue]\nescalate_after_s = { urgentish = 3 }\n", ["queue.escalate_after_s", "urgentish"]),
    ("[security]\ntoken_secret = 'short'\n", ["security.token_secret", "at least 32"]),
    ("[sever]\nport = 1\n", ["sever", "Extra inputs are not permitted"]),
    ("[live]\nbackend = 'redis-cluster'\n", ["live.backend", "'redis-cluster'", "memory"]),
])
def test_a_bad_value_names_the_key_the_value_and_what_was_expected(
    tmp_path: Path, text: str, expected: list[str]
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    for fragment in expected:
        assert fragment in str(caught.value), str(caught.value)


def test_a_bad_environment_value_is_reported_too(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TELEHEALTH_QUEUE__TICK_S", "soon")
    with pytest.raises(ConfigError) as caught:
        load_settings(None)
    assert "queue.tick_s" in str(caught.value) and "'soon'" in str(caught.value)


def test_a_missing_or_broken_file_is_reported(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("[server\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(broken)


def test_serve_with_a_bad_value_stops_with_exit_code_2(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[server]\nport = 'eighty'\n")
    done = subprocess.run(
        [sys.executable, "-m", "telehealth.cli", "--config", str(path), "serve"],
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 2
    assert "server.port = 'eighty'" in done.stderr


def test_the_shipped_relay_example_is_valid() -> None:
    settings = load_settings(REPO / "config" / "relay.example.toml")
    assert settings.relay.capacity == 50
    assert settings.relay.host_addresses == ["10.11.0.20"]
