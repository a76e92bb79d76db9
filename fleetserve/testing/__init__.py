"""Test support, not part of the serving product: nothing outside `tests/` and
`benchmarks/` imports it.

- `fake_replica`: a model-free stand-in for a fleetserve replica (gateway tests, routing
  benchmark); `python -m fleetserve.testing.fake_replica --port 8101`.
- `launcher`: `fleetserve serve` in a child process, waited for until ready.
"""
