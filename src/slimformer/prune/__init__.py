"""Pruning: score functions, masks, and the methods built on them."""
