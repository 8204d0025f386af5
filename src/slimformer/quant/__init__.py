"""Quantization: affine math (qscheme), packing, and the methods built on them."""
