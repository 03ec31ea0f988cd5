"""The ``remotellm-broker`` command line: serve, users, usage."""
