"""Kernels: no model knowledge. Expert backends (reference, torch, native), GLU activations, oneDNN packing."""
