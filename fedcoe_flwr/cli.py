"""Command-line entry points share one rule: a user's mistake (a bad config value, missing
data, an unusable checkpoint, a federation that does not match) is one short line on
stderr and exit status 2, never a traceback; ``FEDCOE_DEBUG=1`` shows the traceback."""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from typing import Iterator

from .client.node import NodeConfigError
from .config import ConfigError
from .data import DataError
from .server.callbacks.checkpoint import CheckpointError
from .server.nodes import FederationError
from .server.onboarding import OnboardingError

USER_ERRORS = (ConfigError, DataError, CheckpointError, FederationError, OnboardingError, NodeConfigError)
DEBUG_ENV = "FEDCOE_DEBUG"


@contextmanager
def user_errors() -> Iterator[None]:
    try:
        yield
    except USER_ERRORS as err:
        if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            raise
        print(f"error: {err}", file=sys.stderr)
        print(f"(set {DEBUG_ENV}=1 for the traceback)", file=sys.stderr)
        raise SystemExit(2) from None
