"""The server process: the supervisor, the hand-off of connections to workers, uvicorn's protocol."""
