"""Data sources (built-in aliases and files) and tokenization into windows."""
