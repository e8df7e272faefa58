"""Scheduling and KV-cache bookkeeping. Pure Python/numpy: this package never imports JAX."""
