"""What the stages share: the network, its conditioning, the objective and REPA loss, the samplers, the
checkpoint and run-directory formats, the validation split, option declarations, and (in
``stages.core.encoders``) the frozen encoders and image preprocessing.

Import rules (checked by tests/test_layout.py): this package imports only ``cache_schema`` and
itself; nothing outside ``stages.core.encoders`` imports the encoders, so training never does.
"""
