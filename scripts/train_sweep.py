"""Run the training-step matrix on the lent GPU in one device call: one fresh process per model
(forked before CUDA starts, torch and transformers already imported), every case of that model
in it, one JSON row per case in OUT as it comes.

    scripts/device-run.sh python3 scripts/train_sweep.py MATRIX.yaml OUT.jsonl SECONDS
"""

from __future__ import annotations

import json
import multiprocessing as mp
import sys
import tempfile
import time
from pathlib import Path

import torch  # noqa: F401  (loaded before forking)
import transformers  # noqa: F401
import yaml
from vramplan.source import resolve
from vramplan.validate.sweep import expand_training_matrix


def _run(job_path: str, out_path: str) -> None:
    from vramplan.validate import train

    train.main(job_path, out_path)


def main(matrix_path: str, out_path: str, seconds: float) -> None:
    deadline = time.time() + seconds
    cases = expand_training_matrix(yaml.safe_load(Path(matrix_path).read_text()))
    by_model: dict[tuple, list[dict]] = {}
    for case in cases:
        by_model.setdefault((case["model"], case["layers"]), []).append(case)
    ctx = mp.get_context("fork")
    for (model, _layers), group in by_model.items():
        left = deadline - time.time()
        if left < 15:
            print("deadline reached", flush=True)
            break
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as fh:
            json.dump({"config": resolve(model).config, "cases": group}, fh)
        proc = ctx.Process(target=_run, args=(fh.name, out_path))
        proc.start()
        proc.join(left)
        if proc.is_alive():
            proc.kill()
            print(f"{model}: killed at the deadline", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], float(sys.argv[3]))
