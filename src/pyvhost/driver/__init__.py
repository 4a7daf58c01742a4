"""The driver side: a front-end and guest driver in one process, to exercise back-ends (no VM)."""
