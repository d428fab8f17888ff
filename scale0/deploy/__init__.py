"""Deployment: `scale0 up`, the Mongrel2 server it runs and its config.sqlite."""
