"""``medgru serve``, ``medgru demo`` (being written)."""


def register(sub):
    pass
