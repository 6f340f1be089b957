"""Training: the MNIST files (IDX reader) and the trainer that exports a model file."""
