"""Provider `sim`: the deterministic simulated model, in-process, with optional latency and errors.

`request_log` appends one line per answered request, so tests running chunbot in another
process can count what was sent.
"""

from __future__ import annotations

import asyncio
import os
import random

import orjson

from ..config import ModelSpec
from ..sim import model as sim_model
from .types import ProviderError, Reply, Request


class SimProvider:
    def __init__(self, spec: ModelSpec):
        self.spec = spec
        self._log_fd = (os.open(spec.request_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
                        if spec.request_log else None)

    async def complete(self, request: Request, url: str = "sim") -> Reply:
        spec = self.spec
        if spec.latency_ms or spec.jitter_ms:
            delay = spec.latency_ms + random.uniform(-spec.jitter_ms, spec.jitter_ms)
            await asyncio.sleep(max(0.0, delay) / 1000)
        if spec.error_rate and random.random() < spec.error_rate:
            raise ProviderError("sim: injected server error (HTTP 503)", retryable=True, status=503)
        answer = sim_model.reply(spec.model, request.messages, request.params, spec.wrong_rate,
                                   spec.flaky_rate)
        if self._log_fd is not None:
            key = sim_model.request_seed(spec.model, request.messages, request.params)
            os.write(self._log_fd, orjson.dumps({"key": f"{key:016x}"}) + b"\n")
        return Reply(text=answer.text, model=spec.model, input_tokens=answer.input_tokens,
                     output_tokens=answer.output_tokens, finish_reason=answer.finish_reason)

    async def close(self) -> None:
        if self._log_fd is not None:
            os.close(self._log_fd)
            self._log_fd = None
