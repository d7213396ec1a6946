"""Resolving a --model argument to a checkpoint, and loading it once, quantized as asked, on one device."""
