"""The model's exception for a bad setting, carrying the name of the setting.

A caller that maps settings to a file (a study file's ``[training]`` table) reads
``exc.field`` instead of parsing the message.
"""

from __future__ import annotations


class SettingError(ValueError):
    """A setting cannot be used; ``field`` names it (None: a combination of settings)."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field
