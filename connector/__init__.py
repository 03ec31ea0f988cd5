"""The RemoteLLM connector: runs next to the local LLM, reaches the broker outbound only."""
