"""Training and evaluation of detectors: ``medgru train`` and ``medgru evaluate``."""
