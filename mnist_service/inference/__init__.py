"""Inference: the runtimes (TorchScript, ONNX Runtime) behind one protocol, integrity checks, preprocessing and the
batching predictor. Only `torchscript_runtime` imports torch."""
