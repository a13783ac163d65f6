"""The ``aroma-jax`` command line."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="aroma-jax", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("toy", help="run the toy rank-recovery example (AROMA vs LoRA r=8)")
    sub.add_parser("demo", help="the main job (currently the toy example)")
    args = parser.parse_args(argv)
    if args.command in ("toy", "demo"):
        from aroma_jax.examples import toy

        toy.main()
    return 0


if __name__ == "__main__":
    sys.exit(main())
