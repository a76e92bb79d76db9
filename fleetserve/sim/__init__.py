"""The fleet simulator: fleetserve's own scheduler, KV-cache manager, router, admission and
autoscaler on a virtual clock, with a cost model in place of the model (`fleetserve
simulate`)."""
