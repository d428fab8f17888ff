"""`make bench`: Scale0 against a direct Mongrel2 handler, measured with wrk (see run.py)."""
