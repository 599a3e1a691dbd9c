"""The simulator: a deterministic model (`model`), used in-process by the provider `sim` and
served over HTTP, OpenAI-, Anthropic- and Gemini-style, by `chunbot sim serve` (`server`)."""
