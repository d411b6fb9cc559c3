#!/usr/bin/env python3
"""How fast a cold `vramplan estimate` answers on a local config (a benchmark, not a test).

Runs the console script in a fresh process N times on a config.json written to a temp dir
(no bundle lookup, no network) and prints the median and worst wall time, plus the modules
that cost the most to import (python -X importtime).

    python scripts/bench_startup.py [--runs 15]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from vramplan.source import load_bundled


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args()
    exe = shutil.which("vramplan")
    if exe is None:
        print("install vramplan first (pip install -e .)", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "config.json"
        config.write_text(json.dumps(load_bundled("meta-llama/Llama-3.1-8B").config))
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        times = []
        for _ in range(args.runs):
            start = time.perf_counter()
            subprocess.run([exe, "estimate", str(config), "--json"], check=True, env=env,
                           stdout=subprocess.DEVNULL)
            times.append(time.perf_counter() - start)
        imports = subprocess.run([sys.executable, "-X", "importtime", "-c", "import vramplan.cli"],
                                 capture_output=True, text=True, env=env, check=False).stderr
    print(f"cold `vramplan estimate <config.json>`: median {statistics.median(times) * 1000:.0f} ms, "
          f"worst {max(times) * 1000:.0f} ms over {args.runs} runs")
    costs = []
    for line in imports.splitlines():
        match = re.match(r"import time:\s+\d+ \|\s+(\d+) \|\s+(\S+)$", line.strip())
        if match and "." not in match.group(2):
            costs.append((int(match.group(1)), match.group(2)))
    print("top-level imports by cumulative time:",
          ", ".join(f"{name} {us / 1000:.0f} ms" for us, name in sorted(costs, reverse=True)[:6]))
    heavy = [m for m in ("torch", "transformers") if re.search(rf"\| +{m}$", imports, re.MULTILINE)]
    print("torch/transformers imported:", heavy or "no")
    return 0


if __name__ == "__main__":
    sys.exit(main())
