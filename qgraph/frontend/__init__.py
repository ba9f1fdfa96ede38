"""Hugging Face in, plain ONNX out: model sources, the raw export, and one module per model family."""
