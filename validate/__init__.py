"""vramplan.validate: load a model on a real GPU, run a workload, measure, compare.

Only this subpackage imports torch and transformers; `vramplan estimate` never does.
"""
