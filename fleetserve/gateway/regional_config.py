"""A regional gateway's settings: its region, its peer regions, the regional policy and its
knobs, and how it watches its peers. Validated once; the flags and the `regions:` mapping
of `--gateway-config` are read in `regional_options`.

A peer is another region's gateway: its name, its base URL, and the round trip to it that
the operator expects (the estimate until the first polls measure it)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from fleetserve.gateway.replica import check_replica_url
from fleetserve.regions.policy import REGIONAL_POLICIES, RegionalConfig

# A region's name: a label value and a header value, so a short plain word.
REGION_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]{0,62}", re.IGNORECASE)
# The header naming the region a peer spilled a request from (trusted with the peer key only).
SPILLED_FROM_HEADER = "X-Fleetserve-Spilled-From"
# The origin's reason (spill or failover), and its client key's priority class.
SPILL_REASON_HEADER = "X-Fleetserve-Spill-Reason"
PRIORITY_HEADER = "X-Fleetserve-Priority"
PEER_KEY_ENV = "FLEETSERVE_PEER_KEY"
MAX_POLL_S = 3600.0  # the longest poll interval or poll deadline


def check_region_name(name: object, what: str = "region name") -> str:
    if not isinstance(name, str) or not REGION_NAME.fullmatch(name):
        raise ValueError(
            f"{what} {name!r} must be 1-63 letters, digits, '_', '.' or '-' "
            "(starting with a letter or digit)"
        )
    return name


@dataclass(frozen=True)
class PeerConfig:
    name: str
    url: str
    rtt_s: float | None = None  # the expected round trip until one is measured

    def __post_init__(self) -> None:
        check_region_name(self.name, "peer name")
        try:
            object.__setattr__(self, "url", check_replica_url(self.url))
        except ValueError as exc:
            raise ValueError(f"peer {self.name}: {exc}".replace("replica URL", "URL")) from None
        if self.rtt_s is not None and not (
            isinstance(self.rtt_s, int | float)
            and not isinstance(self.rtt_s, bool)
            and math.isfinite(self.rtt_s)
            and self.rtt_s >= 0
        ):
            raise ValueError(f"peer {self.name}: the round trip must be >= 0, got {self.rtt_s!r}")


def parse_peer(text: str) -> PeerConfig:
    """`NAME=URL[@RTT_MS]`, e.g. `us-east=http://10.0.0.5:8000@80`."""
    name, sep, rest = text.partition("=")
    if not sep or not name or not rest:
        raise ValueError(f"--peer {text!r}: expected NAME=URL[@RTT_MS]")
    url, at, rtt = rest.rpartition("@") if "@" in rest.rsplit("/", 1)[-1] else (rest, "", "")
    rtt_s = None
    if at:
        try:
            rtt_ms = float(rtt)
        except ValueError:
            raise ValueError(
                f"--peer {text!r}: the round trip after '@' must be milliseconds, got {rtt!r}"
            ) from None
        rtt_s = rtt_ms / 1000
    return PeerConfig(name, url, rtt_s)


@dataclass(frozen=True)
class RegionsConfig:
    region: str  # this gateway's region
    peers: tuple[PeerConfig, ...] = ()
    policy: str = "spill"
    policy_config: RegionalConfig = field(default_factory=RegionalConfig)
    # The credential peers present to each other (state route, spilled requests). Required
    # with peers: a peer route without a credential would let anyone skip the client keys.
    peer_key: str | None = field(default=None, repr=False)
    poll_interval_s: float = 1.0
    poll_timeout_s: float = 1.0  # a poll's deadline: a slower answer is a failed poll
    unhealthy_after: int = 3  # failed polls in a row that take a peer out
    rtt_alpha: float = 0.3  # weight of the newest round trip in the moving average
    max_prefix_blocks: int = 65536  # prompt blocks remembered per peer (LRU)

    def __post_init__(self) -> None:
        check_region_name(self.region)
        if self.policy not in REGIONAL_POLICIES:
            raise ValueError(
                f"regional policy: unknown {self.policy!r}; choose from {REGIONAL_POLICIES.names()}"
            )
        names = [p.name for p in self.peers]
        if self.region in names:
            raise ValueError(f"peer {self.region!r} is this gateway's own region")
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"peers {dupes} are named twice")
        urls = [p.url for p in self.peers]
        if len(set(urls)) != len(urls):
            raise ValueError("two peers have the same URL")
        if self.peers and not self.peer_key:
            raise ValueError(
                f"peers need a peer key: the same secret on every regional gateway, from "
                f"${PEER_KEY_ENV} (or --peer-key, or peer_key under regions: in --gateway-config)"
            )
        if self.peer_key is not None and len(self.peer_key) < 16:
            raise ValueError("the peer key must be at least 16 characters")
        if self.peer_key is not None and not all("!" <= c <= "~" for c in self.peer_key):
            # a newline (an env var read from a file) cannot go in a header, and spaces at
            # either end are stripped from the presented key: the peers never matched
            raise ValueError(
                "the peer key must be visible ASCII characters only (no spaces or newlines)"
            )
        for name in ("poll_interval_s", "poll_timeout_s", "rtt_alpha"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"regions: {name} must be > 0, got {value!r}")
        for name in ("poll_interval_s", "poll_timeout_s"):
            # longer, and a peer that stops answering keeps its last report (healthy) that long
            if getattr(self, name) > MAX_POLL_S:
                raise ValueError(
                    f"regions: {name} must be <= {MAX_POLL_S:g} s, got {getattr(self, name)!r}"
                )
        if self.rtt_alpha > 1:
            raise ValueError(f"regions: rtt_alpha must be <= 1, got {self.rtt_alpha!r}")
        for name in ("unhealthy_after", "max_prefix_blocks"):
            if getattr(self, name) < 1:
                raise ValueError(f"regions: {name} must be >= 1, got {getattr(self, name)!r}")

    def peer(self, name: str) -> PeerConfig | None:
        return next((p for p in self.peers if p.name == name), None)
