#!/usr/bin/env python3
"""Regenerate README.md's table of replayed vLLM start-up logs (issue 11).

Every row of profiles/vllm_startup_logs.yaml with a `predict:` block, replayed with its release's
rules (vramplan.validate.vllmcheck): weights, KV pool and token count as logged and as predicted,
written between <!-- vllm:start --> and <!-- vllm:end -->.

    python scripts/vllm_table.py          # rewrite README.md's table
    python scripts/vllm_table.py --check  # exit 1 if README.md is stale
"""

from __future__ import annotations

import sys

import readme_block
from vramplan.validate.vllmcheck import GIB, TESTABLE, predict

START, END = "<!-- vllm:start -->", "<!-- vllm:end -->"


def _gpu(spec: dict) -> str:
    total = f" ({spec['total_gib']} GiB)" if spec.get("total_gib") else ""
    return f"{spec['gpu']}{total}" if spec.get("gpu") else f"logged total{total}"


def _error(got: float, want: float | None) -> str:
    return "—" if want is None else f"{(got - want) / abs(want):+.1%}"


def table() -> str:
    lines = ["| row | rules | GPU | tp | weights GiB logged / predicted | KV pool GiB logged / predicted | pool error "
             "| tokens logged / predicted | token error |", "|---|---|---|---|---|---|---|---|---|"]
    errors, weights = [], []
    for row in TESTABLE:
        spec, logged = row["predict"], row["logged"]
        startup = predict(row)
        weights_logged = logged.get("model_loading_gib") or logged.get("weights_gib")
        pool, tokens = logged.get("kv_cache_gib"), logged.get("kv_cache_tokens")
        pool_got, tokens_got = startup.kv_cache_bytes / GIB, startup.kv_cache_tokens
        lines.append(
            f"| {row['id']} | {spec['rules']} | {_gpu(spec)} | {spec.get('tp', 1)} | "
            f"{weights_logged if weights_logged is not None else '—'} / {startup.model_loading_bytes / GIB:.2f} | "
            f"{f'{pool:.2f}' if pool is not None else '—'} / {pool_got:.2f} | {_error(pool_got, pool)} | "
            f"{f'{tokens:,}' if tokens is not None else '—'} / {tokens_got:,} | {_error(tokens_got, tokens)} |")
        found = [abs(got / want - 1) for got, want in ((pool_got, pool), (tokens_got, tokens)) if want]
        if found:
            errors.append(max(found))
        if weights_logged is not None:
            weights.append((abs(startup.model_loading_bytes / GIB - weights_logged), row["id"]))
    worst_weight, worst_row = max(weights)
    summary = (f"Of the {len(errors)} rows that log a pool or a token count, {sum(e <= 0.03 for e in errors)} are "
               f"within ±3% and {sum(e <= 0.05 for e in errors)} within ±5% (pools a row marks unchecked "
               f"included); weights are within {worst_weight:.2f} GiB on all {len(weights)} rows that log them "
               f"(the largest gap: {worst_row}).")
    return "\n".join(lines) + "\n\n" + summary


def main() -> int:
    return readme_block.main(START, END, table, "vLLM table", "scripts/vllm_table.py", __doc__.splitlines()[0])


if __name__ == "__main__":
    sys.exit(main())
