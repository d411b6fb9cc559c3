#!/usr/bin/env python3
"""Write a checkpoint with random weights for MODEL's config (no download), to exercise the
real loading path offline: `vramplan validate DIR --weights checkpoint` then loads it through
from_pretrained, quantization included.

    python scripts/save_random_checkpoint.py llama-3.2-1b /tmp/llama-1b [--layers N] [--dtype bf16]
"""

from __future__ import annotations

import argparse
import sys

from vramplan.model import architecture_from_config
from vramplan.source import resolve
from vramplan.validate import measure


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("directory")
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--dtype", default="bf16", choices=sorted(measure.TORCH_DTYPES))
    args = parser.parse_args()
    config = resolve(args.model).config
    arch = architecture_from_config(config, args.model)
    attn = "sdpa" if "sdpa" in arch.attention_implementations else "eager"
    model = measure.build_random(config, args.dtype, attn, args.layers)
    model.save_pretrained(args.directory)
    print(f"wrote {args.directory}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
