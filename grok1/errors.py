"""Errors grok1 reports to users.

Every problem with a user's input (a config, a checkpoint file, a request) is raised as a
`Grok1Error` whose message names the file, tensor or field at fault; the CLI prints it and exits
non-zero instead of showing a traceback.
"""

from __future__ import annotations


class Grok1Error(Exception):
    """A problem with user input, reported with a specific, human-readable message."""


class ConfigError(Grok1Error, ValueError):
    """An invalid model configuration (names the field)."""


class CheckpointError(Grok1Error):
    """An unreadable or inconsistent checkpoint (names the file and the parameter path)."""
