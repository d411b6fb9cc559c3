"""Runtime terms: what transformers' generate() or forward() allocates beyond the weights.

kv_cache.py      the cache as transformers' DynamicCache layers hold it
attention.py     which SDPA kernel runs, and the workspace of each attention implementation
activations.py   the candidate peaks of a forward (MLP, attention, logits, decode step)
overhead.py      the cuBLAS workspace, the inputs, memory outside torch, the allocator's reserve

Each function is pure: typed inputs, integer bytes out, no I/O.
"""
