"""The application layer: run configs, the model+task pipeline, the runner, checkpoints,
artifacts, exports and plots. Imports ``core``, ``data`` and ``models``; never the CLI.
"""
