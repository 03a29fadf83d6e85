"""The GLM network, tensor-parallel layers, checkpoints, tokenizer and generation."""
