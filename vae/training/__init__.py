"""Training infrastructure around the models: callbacks, checkpoints, run directories and
``metrics.json``, the config schema, the TensorBoard tag names and writers.

Nothing here computes a loss; the maths lives in ``vae.losses`` and ``vae.nn``.
"""
