"""Signalling a replica's whole process group: a replica leads its own group (started with
`start_new_session=True`), and its engine core process is in it."""

from __future__ import annotations

import os
import signal


def signal_group(pid: int, sig: signal.Signals) -> None:
    """Send `sig` to the process group led by `pid`; a group that is gone already is fine."""
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass
