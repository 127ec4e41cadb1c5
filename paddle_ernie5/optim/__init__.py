"""Optimizers (AdamW, AdaGC clipping) and learning-rate schedules."""
