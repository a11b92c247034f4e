"""Low-bit weights: formats, quantization, per-expert bit-width allocation."""
