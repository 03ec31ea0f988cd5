"""The connector-facing relay protocol (``/relay/v1/*``): polls, uploads, the mux, enrollment."""
