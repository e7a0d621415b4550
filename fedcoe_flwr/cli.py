"""Command-line entry points share one rule: a user's mistake (a bad config value, missing
data, an unusable checkpoint, a federation that does not match) is one short line on
stderr and exit status 2, never a traceback; ``FEDCOE_DEBUG=1`` shows the traceback."""

from __future__ import annotations

import logging
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
from .server.run_dir import RunInUseError

USER_ERRORS = (ConfigError, DataError, CheckpointError, FederationError, OnboardingError, NodeConfigError,
               RunInUseError)
DEBUG_ENV = "FEDCOE_DEBUG"
DEBUG_HINT = f"(set {DEBUG_ENV}=1 for the traceback)"


def debugging() -> bool:
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


class UserErrorsWithoutTraceback(logging.Filter):
    """Flower logs an app's exception with its traceback (``exc_info``); for a user's mistake
    the record keeps one line, the error's own message."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, USER_ERRORS) and not debugging():
            record.msg, record.args = f"{record.getMessage()}: {error} {DEBUG_HINT}", None
            record.exc_info, record.exc_text = None, None
        return True


def quiet_user_errors_in_flower_logs() -> None:
    """Idempotent: the app modules call it on import, in every process Flower loads them in."""
    logger = logging.getLogger("flwr")
    if not any(isinstance(f, UserErrorsWithoutTraceback) for f in logger.filters):
        logger.addFilter(UserErrorsWithoutTraceback())


@contextmanager
def user_errors() -> Iterator[None]:
    try:
        yield
    except USER_ERRORS as err:
        if debugging():
            raise
        print(f"error: {err}", file=sys.stderr)
        print(DEBUG_HINT, file=sys.stderr)
        raise SystemExit(2) from None
