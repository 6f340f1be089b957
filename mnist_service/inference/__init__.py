"""Inference: the network and its file format, integrity checks, preprocessing and the batching predictor."""
