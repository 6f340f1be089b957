"""Client-side tools: the Python client, the stress tester's engine, test-image writers."""
