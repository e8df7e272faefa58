"""Llama-family models as pure functions over a params pytree."""
