"""Requests that come and go: the engine and its neighbours (requests, sampling, prefix cache,
speculation, constraints), the synchronous driver, Meta's padded loop, the engine thread.
"""
