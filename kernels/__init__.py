"""Quantized matmul and dequantization ops (torch reference, CPU and CUDA paths)."""
