"""chunbot: stream JSONL records through LLM stages described in YAML.

As a library: `chunbot.load("p.yaml")` (or `chunbot.load({...})` with the YAML's keys)
gives a validated Pipeline; `chunbot.stream(p, rows)`, `chunbot.astream(p, rows)` and
`chunbot.run_records(p, rows)` run it over dicts in memory (library.py);
`chunbot.estimate(p)` says what a run would spend, sending nothing;
`chunbot_cli.engine.run(pipeline)` runs it on its workdir as the CLI does.
"""

__version__ = "0.1.0"

from .config import ConfigError, Pipeline, load  # noqa: E402  (after __version__: cli reads it)
from .library import astream, estimate, run_records, stream  # noqa: E402

__all__ = ["ConfigError", "Pipeline", "load", "stream", "astream", "run_records", "estimate",
           "__version__"]
