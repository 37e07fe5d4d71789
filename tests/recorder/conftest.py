from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.recorder.recordings import record


@pytest.fixture(scope="session")
def clip(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    """One second of a participant's camera (VP8 + 440 Hz Opus), recorded once per run."""
    path = tmp_path_factory.mktemp("clips") / "clip.webm"
    return path, record(path, seconds=1.0)


@pytest.fixture
def copy_clip(clip: tuple[Path, list[dict[str, Any]]]) -> Any:
    def copy(target: Path) -> list[dict[str, Any]]:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(clip[0], target)
        return clip[1]
    return copy
