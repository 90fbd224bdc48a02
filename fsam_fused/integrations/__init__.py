"""Glue for training frameworks, one module each, imported only by those who use them.

``fsam_fused.integrations.lightning`` (PyTorch Lightning) and
``fsam_fused.integrations.accelerate`` (Hugging Face Accelerate); ``docs/training_loops.md``
shows each in a whole script.
"""
