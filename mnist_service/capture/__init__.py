"""Ground truth: what the model saw and answered (captures), the labels users send back, and the way
from the capture database into training (docs/ground-truth.md)."""
