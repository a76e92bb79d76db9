"""Many regions: regional routing policies (pure), shared by live gateways and the simulator."""
