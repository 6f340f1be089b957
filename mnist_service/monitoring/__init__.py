"""Monitoring: the drift reference saved with a model, and the statistics the server counts live."""
