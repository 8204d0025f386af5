"""Metrics: perplexity, embedding fidelity, linear probe, size, latency, and the report."""
