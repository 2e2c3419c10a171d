"""Quantization: the packed low-bit format every backend reads, and the methods that produce it."""
