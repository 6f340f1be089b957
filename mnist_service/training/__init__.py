"""Training: the network, the trainer, and export to TorchScript and ONNX with their agreement check."""
