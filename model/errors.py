"""The exceptions of a bad setting or usage; a bad setting carries the name of the setting.

A caller that maps settings to a file (a study file's ``[training]`` table) reads
``exc.field`` instead of parsing the message.
"""

from __future__ import annotations


class UsageError(ValueError):
    """A value the user gave (a flag, a setting, a file, a URL) cannot be used: the
    commands say it in one line and exit 2. Any other ValueError is the service's own
    failure: one line as unexpected, exit 1, the traceback on request."""


class SettingError(UsageError):
    """A setting cannot be used; ``field`` names it (None: a combination of settings)."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field
