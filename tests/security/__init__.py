"""Attacks on the relay, each as a test against real processes (docs/security.md).

One module per area: paths, headers, request IDs, model names and claims, memory, the
connector-facing routes, the portal, the data files, logs and errors.
"""
