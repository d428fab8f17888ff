"""Pure cores: the decisions (routing, dispatch, screening), clock-free (they take `now`)."""
