"""Process settings applied before Prefect is imported."""

from __future__ import annotations

import os

# Analytics off: these machines have no network, and stackwise sends nothing anywhere.
PREFECT_DEFAULTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "TF_CPP_MIN_LOG_LEVEL": "2",
    # Prefect 3.9 waits 20 s for its temporary server to start. On a busy 2-core machine
    # (other runs training) the start took longer, and the run failed before any stage.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
}


def apply_prefect_defaults() -> None:
    """Set stackwise's environment defaults; values the user already set win."""
    for name, value in PREFECT_DEFAULTS.items():
        os.environ.setdefault(name, value)


def default_data_dir() -> str:
    """Return the artifact store folder used when no --data-dir is given."""
    return os.environ.get("STACKWISE_DATA_DIR", "data")
