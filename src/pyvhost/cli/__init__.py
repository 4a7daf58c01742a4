"""Command-line tools: serve, probe, trace, exercise, demo."""
