"""The federated fleet's Flower-free parts: run configuration, budgets, the run log."""
