"""Rewrite (or check) one generated block of README.md, between two HTML comment markers.
Shared by the scripts that write README's tables from committed measurements."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def main(start: str, end: str, render: Callable[[], str], what: str, script: str, description: str) -> int:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--check", action="store_true", help="exit 1 if README.md is stale")
    args = parser.parse_args()
    text = README.read_text()
    if start not in text or end not in text:
        print(f"README.md lacks the {start} / {end} markers", file=sys.stderr)
        return 1
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    block = render()
    new = f"{head}{start}\n{block}\n{end}{tail}"
    if args.check:
        if new != text:
            print(f"README.md's {what} is stale: run {script}", file=sys.stderr)
            return 1
        return 0
    README.write_text(new)
    print(block)
    return 0
