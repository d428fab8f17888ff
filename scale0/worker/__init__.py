"""The worker processes: the WSGI and ASGI adapters and the loops that serve brokers."""
