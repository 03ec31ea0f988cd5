"""Who may use the broker: API keys, portal users and enrolled connectors.

Each lives in an operator-editable YAML file; ``store.YamlFileStore`` is the one way such a
file is read, watched, locked and written.
"""
