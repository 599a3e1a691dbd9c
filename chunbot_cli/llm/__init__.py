"""LLM calls: request and reply types, the providers, and the client that limits and retries them."""
