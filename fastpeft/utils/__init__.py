"""Shared helpers: atomic file IO, model-type constants, module surgery."""
