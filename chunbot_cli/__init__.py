"""chunbot: stream JSONL records through LLM stages described in YAML."""

__version__ = "0.1.0"
