"""The transformers runtime: what generate() or forward() allocates beyond the weights.

kv_cache.py      the cache as transformers' DynamicCache layers hold it
attention.py     which SDPA kernel runs, and the workspace of each attention implementation
activations.py   the candidate peaks of a forward (MLP, attention, logits, decode step)
experts.py       mixture-of-experts layers (grouped_mm, batched_mm)
recurrent.py     state-space and linear-attention mixers
sequence.py      the same run as a sequence of requests, replayed through the allocator
overhead.py      the cuBLAS workspace, the inputs, memory outside torch
estimate.py      one run -> `Estimate`
serve.py         replicas and tp x pp layouts of generate()

Each function is pure: typed inputs, integer bytes out, no I/O.
"""
