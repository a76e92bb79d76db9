"""The cost model: step time as a function of batch shape, fitted from profiles of the real
engine (`fleetserve profile`)."""
