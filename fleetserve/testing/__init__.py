"""Test support, not part of the serving product: nothing outside `tests/` and
`benchmarks/` imports it.

- `fake_replica`: a model-free stand-in for a fleetserve replica (gateway tests, routing
  benchmark); `python -m fleetserve.testing.fake_replica --port 8101`.
- `fake_fleet`: the fleet's serving code (gateway, supervisor, autoscaler) over fake
  replicas; `python -m fleetserve.testing.fake_fleet fake --min-replicas 0`.
- `launcher`: `fleetserve serve` in a child process, waited for until ready.
"""
