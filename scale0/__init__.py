"""Scale0: a dynamic, service-oriented load balancer for Python web backends behind Mongrel2."""

__version__ = "0.1.0"
