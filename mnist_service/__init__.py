"""MNIST digit classification as a small, fast, sturdy HTTP service."""
