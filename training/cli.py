"""``medgru train`` and ``medgru evaluate``.

``training.train`` and ``training.evaluate`` each provide ``add_arguments(parser)`` and
``run(args, settings) -> int``.
"""

from __future__ import annotations

import argparse
import importlib


def _lazy(module: str):
    def run(args, settings):
        return importlib.import_module(module).run(args, settings)

    return run


def register(sub: argparse._SubParsersAction) -> None:
    from training import evaluate, train

    p = sub.add_parser("train", help="train a detector on the normals of a manifest or folder")
    train.add_arguments(p)
    p.set_defaults(func=_lazy("training.train"))

    p = sub.add_parser("evaluate", help="evaluate a model on a manifest and write a report")
    evaluate.add_arguments(p)
    p.set_defaults(func=_lazy("training.evaluate"))
