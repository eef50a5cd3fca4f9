"""The settings a CLI verb runs with: the environment's, a bad value a one-line error."""

from __future__ import annotations

from lensflow.cli.output import CliError
from lensflow_core.settings import Config


def load_config() -> Config:
    """The settings from the environment; a bad value is a one-line error."""
    try:
        return Config.from_env()
    except ValueError as exc:
        raise CliError(str(exc)) from None
