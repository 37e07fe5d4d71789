"""The adaptation's settings (issue #15): ``relay.adaptation`` and the layer policy's
``relay.layer_*`` thresholds, validated in config/settings.py and carried to the relay by
relay/config.py's MediaConfig as a LayerSettings."""

from __future__ import annotations

from pathlib import Path

import pytest

from config.settings import ConfigError, load_settings
from relay.bandwidth import (
    BACKLOG_HIGH_BYTES,
    LAYER_LOSS,
    MAX_QUIET_S,
    QUEUE_DELAY_S,
    QUIET_S,
    RTT_RISE_S,
    LayerSettings,
)
from relay.config import MediaConfig, from_settings

REPO = Path(__file__).resolve().parents[2]


def test_the_defaults_are_the_policy_constants_and_adaptation_is_on() -> None:
    media = from_settings(load_settings(None).relay)
    assert media.adaptation is True
    assert media.layers == LayerSettings() == LayerSettings(
        quiet_s=QUIET_S, max_quiet_s=MAX_QUIET_S, loss=LAYER_LOSS, rtt_rise_s=RTT_RISE_S,
        backlog_bytes=BACKLOG_HIGH_BYTES, queue_delay_s=QUEUE_DELAY_S)
    assert MediaConfig().adaptation is True and MediaConfig().layers == LayerSettings()


def test_every_setting_reaches_the_media_config(tmp_path: Path) -> None:
    path = tmp_path / "t.toml"
    path.write_text("[relay]\nadaptation = false\nlayer_quiet_s = 10\nlayer_max_quiet_s = 60\n"
                    "layer_loss = 0.1\nlayer_rtt_rise_s = 0.5\nlayer_backlog_bytes = 100000\n"
                    "layer_queue_delay_s = 0.8\n")
    media = from_settings(load_settings(path).relay)
    assert media.adaptation is False
    assert media.layers == LayerSettings(quiet_s=10, max_quiet_s=60, loss=0.1, rtt_rise_s=0.5,
                                         backlog_bytes=100_000, queue_delay_s=0.8)


def test_adaptation_off_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TELEHEALTH_RELAY__ADAPTATION", "false")
    assert from_settings(load_settings(None).relay).adaptation is False


@pytest.mark.parametrize(("text", "expected"), [
    ("adaptation = 'sometimes'", ["relay.adaptation", "'sometimes'", "boolean"]),
    ("layer_loss = 0", ["relay.layer_loss", "0", "greater than 0"]),
    ("layer_loss = 1.5", ["relay.layer_loss", "1.5", "less than or equal to 1"]),
    ("layer_quiet_s = -1", ["relay.layer_quiet_s", "-1", "greater than 0"]),
    ("layer_rtt_rise_s = 0", ["relay.layer_rtt_rise_s", "greater than 0"]),
    ("layer_backlog_bytes = 0", ["relay.layer_backlog_bytes", "greater than 0"]),
    ("layer_queue_delay_s = 0", ["relay.layer_queue_delay_s", "greater than 0"]),
    ("layer_queue_delay_s = 'half a second'", ["relay.layer_queue_delay_s", "number"]),
    ("layer_quiet_s = 30\nlayer_max_quiet_s = 20",
     ["layer_max_quiet_s = 20", "below layer_quiet_s = 30"]),
    ("layer_backlog_bytes = 600000",
     ["layer_backlog_bytes = 600000", "max_backlog_bytes = 524288", "keep it below"]),
])
def test_a_bad_value_is_refused_with_the_key_and_what_was_expected(
        tmp_path: Path, text: str, expected: list[str]) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(f"[relay]\n{text}\n")
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    for fragment in expected:
        assert fragment in str(caught.value), str(caught.value)


def test_no_backlog_bound_leaves_the_layer_backlog_free(tmp_path: Path) -> None:
    path = tmp_path / "t.toml"
    path.write_text("[relay]\nmax_backlog_bytes = 0\nlayer_backlog_bytes = 600000\n")
    assert from_settings(load_settings(path).relay).layers.backlog_bytes == 600_000


@pytest.mark.parametrize("name", ["example.toml", "relay.example.toml"])
def test_the_shipped_examples_show_the_defaults(name: str) -> None:
    text = (REPO / "config" / name).read_text()
    assert "adaptation = true" in text and "layer_queue_delay_s" in text
    media = from_settings(load_settings(REPO / "config" / name).relay)
    assert media.adaptation is True and media.layers == LayerSettings()
