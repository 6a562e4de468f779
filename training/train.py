"""`medgru train` (being written)."""


def add_arguments(parser):
    pass


def run(args, settings):
    raise NotImplementedError("medgru train is not written yet")
