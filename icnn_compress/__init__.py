"""icnn-compress."""
