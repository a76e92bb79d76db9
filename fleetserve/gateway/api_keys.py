"""API keys, stored as SHA-256 hashes in a YAML file, each with its limits.

```yaml
keys:
  - name: team-a             # shows in logs and metrics; the key itself never does
    sha256: "9f86d081..."    # hex digest, quoted of the key (python -m fleetserve.gateway.api_keys)
    priority: high           # critical | high | normal | low
    requests_per_s: 5        # omitted = unlimited
    tokens_per_min: 20000    # prompt + prompts x n x max_tokens on admission; rest refunded
    max_concurrent: 4
    admin: false             # may call /admin/*, /metrics, /docs (never also a client key)
```

The operator key (`--operator-key`, `$FLEETSERVE_OPERATOR_KEY` or the gateway config's
`operator_key`) is one more admin entry. Without any admin entry the admin routes are off.

A presented key is hashed and compared with every stored hash in constant time
(`hmac.compare_digest`), so neither timing nor early exit tells which hash was close.
"""

from __future__ import annotations

import hashlib
import hmac
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from fleetserve.gateway.priority import DEFAULT_PRIORITY, priority_rank

_HEX = set("0123456789abcdef")


@dataclass(frozen=True)
class KeyLimits:
    requests_per_s: float | None = None
    tokens_per_min: float | None = None
    max_concurrent: int | None = None

    def __post_init__(self) -> None:
        for name in ("requests_per_s", "tokens_per_min", "max_concurrent"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be > 0 (or omitted for no limit), got {value}")


@dataclass(frozen=True)
class ApiKey:
    name: str
    limits: KeyLimits = KeyLimits()
    priority: str = DEFAULT_PRIORITY
    admin: bool = False

    @property
    def priority_rank(self) -> int:
        return priority_rank(self.priority)


ANONYMOUS = ApiKey("anonymous")  # everyone, when no key file is configured


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


OPERATOR = ApiKey("operator", admin=True)


class ApiKeyStore:
    """`clients_need_key`: False when the store holds only the operator key (clients stay
    anonymous, only the operator routes need a key)."""

    def __init__(self, entries: list[tuple[bytes, ApiKey]], clients_need_key: bool = True) -> None:
        digests = [d for d, _ in entries]
        if len(set(digests)) != len(digests):
            names = sorted(k.name for d, k in entries if digests.count(d) > 1)
            raise ValueError(
                f"keys {names} are the same key: give every client and every admin its own "
                "key (an admin key must never also be a client key)"
            )
        self._entries = entries
        self.clients_need_key = clients_need_key

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def has_admin(self) -> bool:
        return any(key.admin for _, key in self._entries)

    def with_operator_key(self, operator_key: str) -> ApiKeyStore:
        """This store plus the operator key; raises ValueError if it is already a key here."""
        entry = (hashlib.sha256(operator_key.encode()).digest(), OPERATOR)
        return ApiKeyStore([*self._entries, entry], self.clients_need_key)

    def lookup(self, presented: str) -> ApiKey | None:
        digest = hashlib.sha256(presented.encode()).digest()
        found = None
        for stored, key in self._entries:  # no early exit: the time does not depend on which
            if hmac.compare_digest(stored, digest):
                found = key
        return found


def load_api_keys(path: str | Path) -> ApiKeyStore:
    """Raises ValueError naming the entry and field when the file is malformed."""
    data = yaml.safe_load(Path(path).read_text()) or {}
    entries: list[tuple[bytes, ApiKey]] = []
    names: set[str] = set()
    for i, item in enumerate(data.get("keys") or []):
        where = f"{path}: keys[{i}]"
        raw = item.get("sha256", "")
        digest = raw.lower() if isinstance(raw, str) else ""  # unquoted digits read as a number
        if len(digest) != 64 or not set(digest) <= _HEX:
            raise ValueError(f"{where}: 'sha256' must be a quoted 64-character hex digest")
        name = str(item.get("name") or f"key{i}")
        if name in names:
            raise ValueError(f"{where}: duplicate name {name!r}")
        names.add(name)
        try:
            limits = KeyLimits(
                requests_per_s=item.get("requests_per_s"),
                tokens_per_min=item.get("tokens_per_min"),
                max_concurrent=item.get("max_concurrent"),
            )
            priority = str(item.get("priority", DEFAULT_PRIORITY))
            priority_rank(priority)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
        key = ApiKey(name, limits, priority, bool(item.get("admin", False)))
        entries.append((bytes.fromhex(digest), key))
    return ApiKeyStore(entries)


def single_key_store(key: str, name: str = "default") -> ApiKeyStore:
    """One client key with no limits (`fleetserve serve --api-key`); never an admin."""
    return ApiKeyStore([(hashlib.sha256(key.encode()).digest(), ApiKey(name))])


def with_operator_key(store: ApiKeyStore | None, operator_key: str | None) -> ApiKeyStore | None:
    """Add the operator key to `store` (or make a store of it alone, clients anonymous).
    Raises ValueError if the operator key is also a client key."""
    if not operator_key:
        return store
    if store is None:
        return ApiKeyStore([], clients_need_key=False).with_operator_key(operator_key)
    return store.with_operator_key(operator_key)


if __name__ == "__main__":
    # Reads the key from stdin so that it never shows in a process list or shell history.
    print(hash_key(sys.stdin.readline().rstrip("\n")))
