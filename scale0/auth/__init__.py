"""CURVE keys and the ZAP handler that admits them."""
