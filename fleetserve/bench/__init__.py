"""`fleetserve bench`: a load generator for OpenAI-compatible servers, and its reports.

Talks HTTP only; imports nothing from the engine, the models or the server. Pure parts (arrival
schedule, lengths, workloads, percentiles, metrics, time series) have no I/O; `runner` and
`client` do the sending, `benchmark` ties a run together, `cli` parses the command line. The
report's JSON schema is in SCHEMA.md.
"""
