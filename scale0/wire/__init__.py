"""Wire codecs: bytes in, values out, and back. No ZeroMQ, no sockets, no clock."""
