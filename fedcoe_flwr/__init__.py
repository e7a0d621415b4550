"""fedcoe-flwr: personalised federated learning with mixtures of experts on Flower."""
