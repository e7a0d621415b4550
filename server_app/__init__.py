"""Flower ServerApp entry point (thin: the work is in fedcoe_flwr)."""
