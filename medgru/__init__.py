"""Shared settings and domain types of the MedGRU worker, and its composition root (``medgru.cli``)."""

__version__ = "0.1.0"
