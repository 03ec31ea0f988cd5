"""``remotellm-bench``: measure what the relay adds over a direct connection.

It imports neither the broker nor the connector: it runs them as processes (as users do),
so their CPU time and memory can be read per process.
"""
