"""Process supervision: the pre-fork pool, its shared child state, parent-death links."""
