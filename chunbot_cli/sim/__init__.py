"""The simulator: a deterministic model used in-process (provider `sim`) and, later, served over HTTP."""
