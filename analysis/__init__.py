"""Probes behind the paper's figures and the shared plotting style."""
