"""pyvhost.devices."""
