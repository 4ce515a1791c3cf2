"""The ``raymerge`` command line: the only package that imports both ``raymerge.engine`` and
``raymerge.cluster``. ``main(argv)`` returns the exit code; every ``RaymergeError`` becomes one
readable line on stderr."""

from raymerge.cli.main import build_parser, describe_methods, main
from raymerge.cli.options import parse_size

__all__ = ["build_parser", "describe_methods", "main", "parse_size"]
