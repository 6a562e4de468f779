"""``medgru train``, ``medgru evaluate`` and ``medgru calibrate``.

``training.train``, ``training.evaluate`` and ``training.calibrate`` each provide
``add_arguments(parser)`` and ``run(args, settings) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import sys


def _lazy(module: str):
    def run(args, settings):
        from training.manifest import InputDataError

        try:
            return importlib.import_module(module).run(args, settings)
        except InputDataError as exc:  # a file the user named: the message names it, no traceback
            print(f"error: {exc}", file=sys.stderr)
            return 2

    return run


def register(sub: argparse._SubParsersAction) -> None:
    from training import calibrate, evaluate, train

    p = sub.add_parser("train", help="train a detector on the normals of a manifest or folder")
    train.add_arguments(p)
    p.set_defaults(func=_lazy("training.train"))

    p = sub.add_parser("evaluate", help="evaluate a model on a manifest and write a report")
    evaluate.add_arguments(p)
    p.set_defaults(func=_lazy("training.evaluate"))

    p = sub.add_parser("calibrate", help="re-set a model's threshold on a site's normals (writes a new model folder)")
    calibrate.add_arguments(p)
    p.set_defaults(func=_lazy("training.calibrate"))
