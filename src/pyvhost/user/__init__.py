"""vhost-user: the sans-I/O codec, the socket transport, the front-end and the back-end."""
