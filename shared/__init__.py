"""Code shared by the broker and the connector: protocol models, framing, errors, logging."""
