"""Runs: the model-file format, run folders (locks, claims, outputs), plain checkpoints, and the one
:func:`~icnn_compress.runs.open.open_run` that every stage uses to read a run."""
