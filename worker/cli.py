"""``medgru jobs`` (being written)."""


def register(sub):
    pass
