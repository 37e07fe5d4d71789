"""Settings schema and shipped example configurations for Telehealth Bridge."""

from config.settings import ConfigError, Settings, load_settings

__all__ = ["ConfigError", "Settings", "load_settings"]
