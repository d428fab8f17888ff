"""The ZeroMQ I/O loops next to Mongrel2: the broker and the relay processes."""
