"""Who may call the broker: user API keys, connector tokens, the users file, enrollment."""
