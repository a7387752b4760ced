"""Benchmarks that print tables (``python -m benchmarks.<name>``); speed targets live here, not in tests."""
