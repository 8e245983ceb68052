"""What the ``vigil`` command line shows a user: no developer output of the model libraries."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from streamer.cli import QUIET_MODEL_LIBRARIES, quiet_model_libraries

VIGIL = Path(sys.executable).with_name("vigil")


@pytest.mark.slow
def test_make_tiny_prints_no_progress_bars_or_transformers_warnings(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in QUIET_MODEL_LIBRARIES}
    env["HF_HUB_OFFLINE"] = "1"
    result = subprocess.run(
        [str(VIGIL), "models", "make-tiny", str(tmp_path / "tiny")],
        env=env,
        capture_output=True,
        timeout=300,
        check=False,
    )
    err = result.stderr.decode(errors="replace")
    assert result.returncode == 0, err[-2000:]
    assert (tmp_path / "tiny" / "vlm" / "config.json").is_file()
    assert "Writing model shards" not in err
    assert "[transformers]" not in err
    assert "%|" not in err  # no tqdm bar of any kind
    assert "wrote tiny models" in err  # our own log line still shows


def test_quieting_keeps_what_the_user_set() -> None:
    environ = {"TRANSFORMERS_VERBOSITY": "info"}
    quiet_model_libraries(environ)
    assert environ == {"TRANSFORMERS_VERBOSITY": "info", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
