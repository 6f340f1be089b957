"""The HTTP service: the FastAPI app, its middleware, request/response models and routes."""
