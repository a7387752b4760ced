"""Objective metrics of the paper's tables (FD, FAD, KL, IS, CLAP score) and eval/audiocaps.py."""
