"""The OpenAI API users call: input checks, admission (limits), the relay to a connector, errors."""
