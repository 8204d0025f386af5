"""Saving and loading compressed models (safetensors + JSON manifest)."""
