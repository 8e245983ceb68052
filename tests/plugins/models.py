"""Tiny model fixtures (filled in with the model work)."""
