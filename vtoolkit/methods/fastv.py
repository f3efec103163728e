"""FastV (in progress)."""
