"""Ablation grids, their launcher, and the result tables."""
