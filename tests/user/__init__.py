"""Tests of the vhost-user codec, transport, front-end and back-end."""
