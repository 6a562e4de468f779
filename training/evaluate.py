"""`medgru evaluate` (being written)."""


def add_arguments(parser):
    pass


def run(args, settings):
    raise NotImplementedError("medgru evaluate is not written yet")
