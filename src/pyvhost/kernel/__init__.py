"""pyvhost.kernel."""
