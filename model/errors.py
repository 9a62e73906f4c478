"""The exceptions of a bad setting or usage; a bad setting carries the name of the setting.

A caller that maps settings to a file (a study file's ``[training]`` table) reads
``exc.field`` instead of parsing the message.
"""

from __future__ import annotations

import os
from pathlib import Path


class UsageError(ValueError):
    """A value the user gave (a flag, a setting, a file, a URL) cannot be used: the
    commands say it in one line and exit 2. Any other ValueError is the service's own
    failure: one line as unexpected, exit 1, the traceback on request."""


class SettingError(UsageError):
    """A setting cannot be used; ``field`` names it (None: a combination of settings)."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


def check_out_dir(path: str | os.PathLike[str], flag: str) -> None:
    """Refuse (:class:`UsageError`, naming ``flag``) a folder that cannot be made or written
    there, before any work whose output would be lost: the first part of the path that
    exists must be a writable directory. Makes nothing."""
    where = Path(path).absolute()
    existing = where
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"{flag} {path}: {existing} is a file, not a folder; give another path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {path}: {existing} cannot be written; give another path")
