"""Models: loading HF Flax models for a task, the LLaMA fixes, GGUF conversion.

Imports ``core`` and ``data`` (asset paths) at most. A new model family goes here.
"""
