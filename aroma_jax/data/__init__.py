"""Data: offline assets, tasks and their splits, training objectives, evaluation scores.

Imports ``core`` at most; knows nothing of models (a model-specific step on a fetched asset,
such as SmolLM2's GGUF conversion, is passed in by the caller).
"""
