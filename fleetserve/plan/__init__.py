"""`fleetserve plan`: the capacity planner over the regional simulator."""
