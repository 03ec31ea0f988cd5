"""The RemoteLLM broker: OpenAI-compatible API, connector relay, key portal."""
