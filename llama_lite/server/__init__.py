"""The OpenAI-compatible HTTP server: routes and middleware (app), the serving of completions and chat,
request bodies (protocol), tool calls, metrics.
"""
