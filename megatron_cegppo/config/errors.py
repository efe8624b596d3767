"""The error of a bad config, shared by the loader and the validator."""

from __future__ import annotations

from typing import Optional, Sequence


class ConfigError(ValueError):
    """A config problem, with the dotted key it concerns. ``problems``: each one, one line."""

    def __init__(self, message: str, problems: Optional[Sequence[str]] = None):
        super().__init__(message)
        self.problems = list(problems) if problems is not None else [message]

    @classmethod
    def of(cls, problems: Sequence[str], header: str = "invalid config") -> "ConfigError":
        return cls(f"{header}:\n  - " + "\n  - ".join(problems), problems)
