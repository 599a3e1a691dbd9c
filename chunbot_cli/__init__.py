"""chunbot: stream JSONL records through LLM stages described in YAML.

As a library: `chunbot.load("p.yaml")` (or `chunbot.load({...})` with the YAML's keys)
gives a validated Pipeline; `chunbot_cli.engine.run(pipeline)` runs it as the CLI does.
"""

__version__ = "0.1.0"

from .config import ConfigError, Pipeline, load  # noqa: E402  (after __version__: cli reads it)

__all__ = ["ConfigError", "Pipeline", "load", "__version__"]
