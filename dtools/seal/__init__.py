"""Envelopes: format, keys and peers."""
