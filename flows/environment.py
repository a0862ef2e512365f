"""Process settings applied before Prefect is imported."""

from __future__ import annotations

import os

# Analytics off: these machines have no network, and stackwise sends nothing anywhere.
PREFECT_DEFAULTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "TF_CPP_MIN_LOG_LEVEL": "2",
    # Prefect's temporary server needs more than its default 20 s on a busy 2-core machine.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
}


def apply_prefect_defaults() -> None:
    """Set stackwise's environment defaults; values the user already set win."""
    for name, value in PREFECT_DEFAULTS.items():
        os.environ.setdefault(name, value)
