"""Priority classes: a smaller rank is served first."""

from __future__ import annotations

PRIORITY_CLASSES: dict[str, int] = {"critical": 0, "high": 1, "normal": 2, "low": 3}
DEFAULT_PRIORITY = "normal"


def priority_rank(name: str) -> int:
    try:
        return PRIORITY_CLASSES[name]
    except KeyError:
        raise ValueError(
            f"unknown priority class {name!r}; use one of {sorted(PRIORITY_CLASSES)}"
        ) from None
