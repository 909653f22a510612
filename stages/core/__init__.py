"""What the stages share, by role: ``model`` (the networks and their shapes), ``diffusion`` (objective, REPA
and its successors, samplers), ``data`` (codec, split, filters), ``files`` (checkpoints, run directories,
released files, grids), ``runtime`` (threads, signals, progress, seeds), ``encoders`` (the frozen encoders and
image preprocessing), plus ``errors``, ``options`` (declaring a command's options once) and ``planning``.

Import rules (checked by tests/test_layout.py): this package imports only ``cache_schema`` and
itself; nothing outside ``stages.core.encoders`` imports the encoders, so training never does.
"""
