"""Pipeline YAML → typed, validated `Pipeline`.

Owns the schema: which keys exist, their types and defaults, the built-in `sim` model
alias, and stage fingerprints. Every mistake raises `ConfigError` with one line naming
the file, the line, the stage and the key, so `validate` and `run` can refuse with exit 2
before any work starts.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import inspect
import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import orjson
import yaml

from .source import MAX_LINE_BYTES


class ConfigError(Exception):
    """A pipeline file that cannot be run; the message is meant for the user as is."""


PROVIDERS = ("sim", "openai", "anthropic", "gemini")
# Where a provider's vendor lives and which variable holds its key, when the YAML says nothing.
VENDOR_DEFAULTS = {
    "openai": ("https://api.openai.com/v1", "OPENAI_API_KEY"),
    "anthropic": ("https://api.anthropic.com", "ANTHROPIC_API_KEY"),
    "gemini": ("https://generativelanguage.googleapis.com", "GEMINI_API_KEY"),
}
DEFAULT_TIMEOUT_S = 600.0
# The prompt a model takes when its alias gives no `max_input_tokens`: each vendor's
# current window (the sim's and any OpenAI-compatible server's: OpenAI's).
DEFAULT_MAX_INPUT_TOKENS = {"sim": 128_000, "openai": 128_000, "anthropic": 200_000,
                            "gemini": 1_048_576}
DEFAULT_OUTAGE_TIMEOUT_S = 600.0
DEFAULT_ANTHROPIC_MAX_TOKENS = 4096
STAGE_KINDS = ("prompt", "filter", "python")
BUILTIN_MODELS = {"sim": {"provider": "sim", "model": "sim-small"}}

_PIPELINE_KEYS = {"name", "input", "output", "workdir", "id_field", "shard_size", "compress",
                  "cache", "models", "defaults", "stages", "tests", "executor", "max_line_bytes"}
_MODEL_KEYS = {"provider", "model", "base_url", "api_key_env", "endpoints", "max_concurrency",
               "rpm", "tpm", "price", "headers", "timeout", "max_tokens", "batch_api", "latency_ms",
               "jitter_ms", "error_rate", "wrong_rate", "flaky_rate", "request_log",
               "max_input_tokens"}
_SIM_ONLY_KEYS = {"latency_ms", "jitter_ms", "error_rate", "wrong_rate", "flaky_rate",
                  "request_log"}
_HTTP_ONLY_KEYS = {"base_url", "api_key_env", "endpoints", "headers", "timeout", "max_tokens",
                   "batch_api"}
_DEFAULTS_KEYS = {"model", "mode", "batch_fallback", "batch_deadline", "retries", "params", "outage_timeout", "cache",
                  "prompt_cache", "max_cost"}
_CACHE_KEYS = {"backend", "path", "url", "ttl"}
PRICE_KEYS = ("input", "output", "cached_input", "cache_write", "batch_discount")
_STAGE_KEYS = {
    "prompt": {"name", "model", "route", "system", "prompt", "output", "fields", "parse",
               "accept", "schema", "reask", "structured", "params", "retries", "mode",
               "batch_fallback",
               "batch_deadline",
               "outage_timeout", "cache", "prompt_cache"},
    "filter": {"name", "filter"},
    "python": {"name", "python"},
}
_STAGE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class ModelSpec:
    """One model alias: which provider serves it and how to reach it."""

    alias: str
    provider: str
    model: str
    base_url: str | None = None
    api_key_env: str | None = None
    endpoints: tuple[str, ...] = ()
    max_concurrency: int | None = None  # None: chosen automatically
    rpm: int | None = None
    tpm: int | None = None
    price: dict[str, float] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)
    timeout: float = DEFAULT_TIMEOUT_S  # seconds for one request, reply included
    max_tokens: int = DEFAULT_ANTHROPIC_MAX_TOKENS  # anthropic only: sent when params lack it
    latency_ms: float = 0.0  # sim only, like the three below
    jitter_ms: float = 0.0
    error_rate: float = 0.0
    wrong_rate: float = 0.0  # a share of first answers wrong (a re-ask gets them right)
    flaky_rate: float = 0.0  # a share of answers wrong at random, as sampling makes them
    request_log: str | None = None
    batch_api: bool = False  # the server has the provider's batch API
    max_input_tokens: int = DEFAULT_MAX_INPUT_TOKENS["openai"]  # a longer prompt is not sent

    def identity(self) -> dict[str, Any]:
        """What decides the replies: part of the fingerprint of every stage using it (and
        so of state.json: without the credentials a URL may carry)."""
        return {"provider": self.provider, "model": self.model,
                "base_url": redact_url(self.base_url) if self.base_url else None}

    @property
    def urls(self) -> tuple[str, ...]:
        """Where requests go: the endpoints when given, else the base URL."""
        return self.endpoints or ((self.base_url,) if self.base_url else ())


@dataclass(frozen=True)
class Route:
    """One entry of a stage's `route:` list: records for which `when` holds (always, when
    it is None: the default) go to this cascade."""

    when: str | None
    models: tuple[str, ...]


@dataclass(frozen=True)
class StageSpec:
    name: str
    kind: str  # "llm" | "filter" | "python"
    fingerprint: str
    line: int = 0
    models: tuple[str, ...] = ()  # a cascade when longer than one; with routes, every
    # model any route may use (the default route's first)
    routes: tuple[Route, ...] = ()  # tried in order; the last has no `when`
    spread: bool = False  # `fields: spread`: a JSON reply's keys become the record's fields
    accept: str | None = None  # an expression the record with its reply must make true
    schema: dict[str, Any] | None = None  # JSON Schema the parsed reply must satisfy
    reask: int = 0  # times the same model is asked again with the problem, then the next
    structured: bool = False  # the provider is asked to hold the reply to the schema
    system: str | None = None
    prompt: str | None = None
    output: str | None = None
    parse: str = "text"
    params: dict[str, Any] = field(default_factory=dict)
    retries: int = 6
    outage_timeout: float = DEFAULT_OUTAGE_TIMEOUT_S  # seconds to wait while all endpoints are down
    cache: bool = True  # the response cache answers this stage's requests
    cache_namespace: str | None = None  # part of the cache key: separates equal requests
    prompt_cache: bool = False  # mark the static prefix for the provider's prompt cache
    mode: str = "realtime"  # or "batch": through the provider's batch API
    batch_fallback: bool = False  # finish items a batch could not in realtime
    batch_deadline: float | None = None  # seconds; then stragglers are finished in realtime
    definition: dict[str, Any] = field(default_factory=dict, compare=False)  # what is hashed
    filter: str | None = None
    python: str | None = None


@dataclass(frozen=True)
class CacheSpec:
    """Where replies are cached: SQLite (default, `path` or the user's cache folder) or Redis."""

    enabled: bool = True
    backend: str = "sqlite"
    path: str | None = None
    url: str | None = None
    ttl: float | None = None  # seconds; older replies are not used


@dataclass(frozen=True)
class Pipeline:
    path: Path
    name: str
    input: str | None
    workdir: Path
    id_field: str | None
    shard_size: int
    compress: str | None
    models: dict[str, ModelSpec]
    stages: list[StageSpec]
    cache: CacheSpec = field(default_factory=CacheSpec)
    output: Path | None = None  # the last stage's records, in input order, after a run
    tests: tuple[Any, ...] = ()  # testbench.Assertion: what `chunbot test` checks per case
    stage_defaults: Any = field(default=None, compare=False, repr=False)  # for extra_stage
    executor: str = "local"  # or "ray": where shard jobs run
    ray_address: str | None = None  # the Ray cluster to join ("auto", HOST:PORT); None: a new one
    max_cost: float | None = None  # USD: `defaults.max_cost`, the cap `run --max-cost` sets
    max_line_bytes: int = MAX_LINE_BYTES  # a longer input line is a bad record

    def stage(self, name: str) -> StageSpec:
        for stage in self.stages:
            if stage.name == name:
                return stage
        known = ", ".join(s.name for s in self.stages)
        raise ConfigError(f"{self.path}: no stage named {name!r} (stages: {known})")

    @property
    def import_paths(self) -> list[str]:
        return import_paths(self.path)


def redact_url(url: str) -> str:
    """A URL without the password or token its userinfo may carry (`https://u:t@host`),
    for everything chunbot writes or prints."""
    return _USERINFO.sub(r"\1***@", url)


_USERINFO = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*://)[^/@]*@")


class _Mapping(dict):
    """A YAML mapping that remembers the line of each key."""

    line: int = 0
    lines: dict[Any, int]


class _Loader(yaml.SafeLoader):
    pass


def _construct_mapping(loader: _Loader, node: yaml.MappingNode) -> _Mapping:
    loader.flatten_mapping(node)
    mapping = _Mapping()
    mapping.line = node.start_mark.line + 1
    mapping.lines = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        if key in mapping:
            raise ConfigError(f"{loader.name}:{line}: duplicate key {key!r}")
        mapping[key] = loader.construct_object(value_node, deep=True)
        mapping.lines[key] = line
    return mapping


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _construct_string(loader: _Loader, node: yaml.ScalarNode) -> str:
    """A string value with `${VAR}` and `${VAR:-default}` taken from the environment
    (`$$` is a plain `$`); a variable that is not set and has no default is an error."""
    value = loader.construct_scalar(node)

    def variable(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, default = match.group(1), match.group(2)
        found = os.environ.get(name)
        if found is None or (found == "" and default is not None):
            if default is None:
                raise ConfigError(f"{loader.name}:{node.start_mark.line + 1}: ${{{name}}}: "
                                  f"environment variable {name} is not set (give a default "
                                  f"with ${{{name}:-…}})")
            return default
        return found

    return _VARIABLE.sub(variable, value) if "$" in value else value


_VARIABLE = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_Loader.add_constructor("tag:yaml.org,2002:str", _construct_string)


class _Where:
    """Builds 'file:line: stage 'x': key 'y': …' messages."""

    def __init__(self, path: Path, mapping: Any, context: str = ""):
        self.path, self.mapping, self.context = path, mapping, context

    def fail(self, message: str, key: str | None = None) -> ConfigError:
        lines = getattr(self.mapping, "lines", {})
        line = lines.get(key) or getattr(self.mapping, "line", 0)
        prefix = f"{self.path}:{line}: " if line else f"{self.path}: "
        if self.context:
            prefix += f"{self.context}: "
        if key is not None:
            prefix += f"key {key!r}: "
        return ConfigError(prefix + message)

    def check_keys(self, allowed: set[str]) -> None:
        for key in self.mapping:
            if key not in allowed:
                close = difflib.get_close_matches(str(key), sorted(allowed), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise self.fail(f"unknown key{hint}; allowed: {', '.join(sorted(allowed))}", key)

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = None,
            required: bool = False) -> Any:
        if key not in self.mapping:
            if required:
                raise self.fail("is required", key)
            return default
        value = self.mapping[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if isinstance(value, bool) and bool not in kinds:
            value = None  # YAML's true/false are ints to Python: refuse them where a number is due
        if not isinstance(value, kind):
            names = " or ".join(k.__name__ for k in kinds)
            given = self.mapping[key]
            raise self.fail(f"must be {_article(names)}, not {type(given).__name__} {given!r}",
                            key)
        return value

    def get_json(self, key: str, default: Any) -> dict[str, Any]:
        """A mapping sent to a provider as JSON: string keys and JSON values only."""
        value = self.get(key, dict, default=default)
        try:
            orjson.dumps(value)
        except TypeError as e:
            raise self.fail(f"must hold JSON values under string keys ({e})", key) from None
        return value


def _article(name: str) -> str:
    names = {"str": "a string", "int": "an integer", "float": "a number", "dict": "a mapping",
             "list": "a list", "bool": "true or false"}
    return " or ".join(names.get(n, n) for n in name.split(" or "))


def load(source: str | Path | Mapping[str, Any]) -> Pipeline:
    """Read and validate a pipeline: a YAML file, or a mapping with the same keys (for
    notebooks and programs; its relative paths are the current directory's). Raises
    ConfigError."""
    if isinstance(source, Mapping):
        return _pipeline(Path(DICT_PIPELINE), source)
    path = Path(source)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such pipeline file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read: {e}") from None
    loader = _Loader(text)
    loader.name = str(path)
    try:
        data = loader.get_single_data()
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(f"{where}: invalid YAML: {problem}") from None
    finally:
        loader.dispose()
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a pipeline file must be a mapping with name, input and stages")
    return _pipeline(path, data)


DICT_PIPELINE = "<pipeline>"  # what messages call a pipeline given as a mapping


def _pipeline(path: Path, data: Mapping[str, Any]) -> Pipeline:
    top = _Where(path, data)
    top.check_keys(_PIPELINE_KEYS)
    name = top.get("name", str, required=True)
    if not _STAGE_NAME.match(name):
        raise top.fail("must be letters, digits, '_', '.' or '-'", "name")
    here = path.parent  # relative paths in the file are the file's, as in docker-compose
    input_spec = top.get("input", str)  # none: the library's rows, or `run --input`
    if input_spec is not None and input_spec != "-":
        input_spec = _beside(here, input_spec)
    workdir = Path(_beside(here, top.get("workdir", str, default=f"runs/{name}")))
    output = top.get("output", str)
    if output is not None:
        output = Path(_beside(here, output))
        if not output.name.endswith((".jsonl", ".jsonl.zst")):
            raise top.fail("must name a .jsonl or .jsonl.zst file", "output")
    # records that have an `id` use it; `id_field: null` numbers every record by position
    id_field = (None if data.get("id_field", "id") is None
                else top.get("id_field", str, default="id"))
    shard_size = top.get("shard_size", int, default=10_000)
    if shard_size < 1:
        raise top.fail("must be at least 1", "shard_size")
    max_line_bytes = _positive(top, "max_line_bytes", MAX_LINE_BYTES)
    compress = top.get("compress", str)
    if compress not in (None, "zstd"):
        raise top.fail("must be 'zstd' (or left out for plain .jsonl)", "compress")
    if compress == "zstd":
        try:
            import zstandard  # noqa: F401
        except ImportError:
            raise top.fail("needs the zstandard package: pip install 'chunbot[zstd]'",
                           "compress") from None

    models = {alias: _model(path, alias, spec) for alias, spec in BUILTIN_MODELS.items()}
    for alias, spec in top.get("models", dict, default={}).items():
        models[alias] = _model(path, alias, spec, data["models"])

    where = _Where(path, top.get("defaults", dict, default=_Mapping()), "defaults")
    where.check_keys(_DEFAULTS_KEYS)
    default_model = where.get("model", str, default="sim")
    if default_model not in models:
        raise where.fail(f"unknown model alias {default_model!r}; known: {', '.join(models)}",
                         "model")
    defaults = _StageDefaults(
        model=default_model, mode=_mode(where), batch_fallback=_batch_fallback(where),
        batch_deadline=_duration(where, "batch_deadline", 0.0) or None,
        retries=where.get("retries", int, default=6),
        params=where.get_json("params", {}),
        outage_timeout=_duration(where, "outage_timeout", DEFAULT_OUTAGE_TIMEOUT_S),
        cache=_stage_cache(where, (True, None)),
        prompt_cache=where.get("prompt_cache", bool, default=False))
    max_cost = where.get("max_cost", (int, float), default=None)
    if max_cost is not None and max_cost < 0:
        raise where.fail("must be 0 or more (USD)", "max_cost")

    raw_stages = top.get("stages", list, required=True)
    if not raw_stages:
        raise top.fail("needs at least one stage", "stages")
    root = _digest({"id_field": id_field, "shard_size": shard_size})
    stages: list[StageSpec] = []
    seen: set[str] = set()
    upstream = root
    for position, raw in enumerate(raw_stages, 1):
        stage = _stage(path, position, raw, models, defaults, upstream)
        if stage.name in seen:
            raise _Where(path, raw, f"stage {stage.name!r}").fail("duplicate stage name", "name")
        seen.add(stage.name)
        stages.append(stage)
        upstream = stage.fingerprint
    return Pipeline(path=path, name=name, input=input_spec, workdir=workdir, id_field=id_field,
                    shard_size=shard_size, compress=compress, models=models, stages=stages,
                    cache=_cache(top), output=output, tests=_tests(top, path.parent, models),
                    stage_defaults=defaults, max_cost=max_cost, max_line_bytes=max_line_bytes,
                    **_executor(top))


@dataclass(frozen=True)
class _StageDefaults:
    model: str
    mode: str
    batch_fallback: bool
    batch_deadline: float | None
    retries: int
    params: dict[str, Any]
    outage_timeout: float
    cache: tuple[bool, str | None]
    prompt_cache: bool


def _cache(top: _Where) -> CacheSpec:
    value = top.get("cache", (dict, bool), default=True)
    if isinstance(value, bool):
        return CacheSpec(enabled=value)
    where = _Where(top.path, value, "cache")
    where.check_keys(_CACHE_KEYS)
    backend = where.get("backend", str, default="sqlite")
    if backend not in ("sqlite", "redis"):
        raise where.fail("must be 'sqlite' or 'redis'", "backend")
    if backend == "redis":
        try:
            import redis  # noqa: F401
        except ImportError:
            raise where.fail("needs redis-py: pip install 'chunbot[redis]'", "backend") from None
    ttl = _duration(where, "ttl", 0.0) or None
    cache_path = where.get("path", str)
    return CacheSpec(backend=backend, path=cache_path and _beside(top.path.parent, cache_path),
                     url=where.get("url", str), ttl=ttl)


def _stage_cache(where: _Where, default: tuple[bool, str | None]) -> tuple[bool, str | None]:
    """`cache: true | false | {namespace: …}` → (on, namespace)."""
    value = where.get("cache", (bool, dict), default=None)
    if value is None:
        return default
    if isinstance(value, bool):
        return value, default[1]
    inner = _Where(where.path, value, where.context + " cache" if where.context else "cache")
    inner.check_keys({"namespace"})
    return True, str(inner.get("namespace", (str, int), default=default[1]))


def _model(path: Path, alias: str, spec: Any, parent: Any = None) -> ModelSpec:
    where = _Where(path, spec, f"model {alias!r}")
    if not isinstance(spec, dict):
        raise _Where(path, parent, "models").fail("must be a mapping with provider and model",
                                                  alias)
    where.check_keys(_MODEL_KEYS)
    provider = where.get("provider", str, required=True)
    if provider not in PROVIDERS:
        raise where.fail(f"unknown provider {provider!r}; known: {', '.join(PROVIDERS)}",
                         "provider")
    if provider != "sim":
        for key in _SIM_ONLY_KEYS & set(spec):
            raise where.fail("is only for the sim provider", key)
    else:
        for key in _HTTP_ONLY_KEYS & set(spec):
            raise where.fail("is only for the HTTP providers (openai, anthropic, gemini)", key)
    max_concurrency = where.get("max_concurrency", (int, str), default="auto")
    if max_concurrency == "auto":
        max_concurrency = None
    elif not isinstance(max_concurrency, int) or max_concurrency < 1:
        raise where.fail("must be 'auto' or a positive integer", "max_concurrency")
    base_url, api_key_env = where.get("base_url", str), where.get("api_key_env", str)
    endpoints = where.get("endpoints", list, default=[])
    if not all(isinstance(e, str) for e in endpoints):
        raise where.fail("must be a list of URLs", "endpoints")
    for key, urls in (("base_url", [base_url] if base_url else []), ("endpoints", endpoints)):
        for url in urls:
            shown = redact_url(url)
            if not url.startswith(("http://", "https://")):
                raise where.fail(f"{shown!r} is not an http:// or https:// URL", key)
            root = redact_url(url.rstrip("/").rpartition("/")[0])
            if provider == "anthropic" and url.rstrip("/").endswith("/v1"):
                raise where.fail(f"{shown!r}: an anthropic URL is the server's root, without "
                                 f"/v1 (requests go to {root}/v1/messages)", key)
            if provider == "gemini" and url.rstrip("/").endswith(("/v1beta", "/v1")):
                raise where.fail(f"{shown!r}: a gemini URL is the server's root, without "
                                 f"/v1beta (requests go to {root}/v1beta/models/MODEL:"
                                 "generateContent)", key)
    vendor = False  # every request goes to the vendor's own API: its key, its batch API
    if provider in VENDOR_DEFAULTS:
        vendor_url, vendor_key_env = VENDOR_DEFAULTS[provider]
        base_url = base_url or (endpoints[0] if endpoints else vendor_url)
        vendor = all(url.rstrip("/") == vendor_url for url in [base_url, *endpoints])
        if vendor:
            api_key_env = api_key_env or vendor_key_env
    if api_key_env and any(_USERINFO.match(url) for url in [base_url or "", *endpoints]):
        # both would be the Authorization header: Basic from the URL, Bearer from the key
        raise where.fail("a URL with credentials (user:password@) is sent with HTTP Basic "
                         "auth, api_key_env with a Bearer key: give one of them, not both",
                         "api_key_env" if "api_key_env" in spec else "base_url")
    price = where.get("price", dict, default={})
    for key, value in price.items():
        if key not in PRICE_KEYS or not isinstance(value, (int, float)):
            raise where.fail(f"takes {', '.join(PRICE_KEYS)} as numbers", "price")
    error_rate = _share(where, "error_rate")
    return ModelSpec(
        alias=alias,
        provider=provider,
        model=where.get("model", str, required=True),
        base_url=base_url.rstrip("/") if base_url else None,
        api_key_env=api_key_env,
        endpoints=tuple(e.rstrip("/") for e in endpoints),
        max_concurrency=max_concurrency,
        rpm=_positive(where, "rpm", None),
        tpm=_positive(where, "tpm", None),
        price=dict(price),
        headers={str(k): str(v) for k, v in where.get_json("headers", {}).items()},
        timeout=_duration(where, "timeout", DEFAULT_TIMEOUT_S),
        max_tokens=_positive(where, "max_tokens", DEFAULT_ANTHROPIC_MAX_TOKENS),
        latency_ms=float(where.get("latency_ms", (int, float), default=0)),
        jitter_ms=float(where.get("jitter_ms", (int, float), default=0)),
        error_rate=float(error_rate),
        wrong_rate=_share(where, "wrong_rate"),
        flaky_rate=_share(where, "flaky_rate"),
        request_log=(where.get("request_log", str) and
                     _beside(path.parent, where.get("request_log", str))),
        batch_api=where.get("batch_api", bool, default=vendor),
        max_input_tokens=_positive(where, "max_input_tokens", DEFAULT_MAX_INPUT_TOKENS[provider]),
    )


def _tests(top: "_Where", folder: Path, models: dict[str, ModelSpec]) -> tuple[Any, ...]:
    """`tests:`: the assertions `chunbot test` applies to every case."""
    from dataclasses import replace

    from .testbench.assertions import AssertionSpecError, parse_assertion

    raw = top.get("tests", list, default=[])
    found = []
    tests_line = getattr(top.mapping, "lines", {}).get("tests", 0)
    for n, entry in enumerate(raw, 1):
        # the entry's own line, and the line of the key at fault within it: a list of
        # tests is long, and `tests:`'s line would not say which entry is wrong
        line = getattr(entry, "line", 0) or tests_line
        try:
            assertion = parse_assertion(entry, folder, models)
        except AssertionSpecError as e:
            at = getattr(entry, "lines", {}).get(e.key) or line
            where = f"{top.path}:{at}: " if at else f"{top.path}: "
            raise ConfigError(f"{where}key 'tests': entry #{n}: {e}") from None
        found.append(replace(assertion, line=line))
    return tuple(found)


def _executor(top: "_Where") -> dict[str, Any]:
    """`executor: local | ray | {ray: ADDRESS}` (ADDRESS: "auto" or HOST:PORT)."""
    value = top.get("executor", (str, dict), default="local")
    if isinstance(value, dict):
        if set(value) != {"ray"} or not isinstance(value["ray"], str):
            raise top.fail("must be local, ray or {ray: ADDRESS} (auto or HOST:PORT)",
                           "executor")
        return {"executor": "ray", "ray_address": value["ray"]}
    if value not in ("local", "ray"):
        raise top.fail("must be local, ray or {ray: ADDRESS} (auto or HOST:PORT)", "executor")
    return {"executor": value}


def _share(where: "_Where", key: str) -> float:
    value = where.get(key, (int, float), default=0.0)
    if not 0 <= value <= 1:
        raise where.fail("must be between 0 and 1", key)
    return float(value)


def _beside(folder: Path, value: str) -> str:
    """A path from the pipeline file, relative to the file's folder unless absolute (and
    so relative to the current directory as the file's own path is: `chunbot run
    jobs/p.yaml` shows `jobs/runs/x`; a pipeline loaded by its absolute path has absolute
    paths, which a notebook may chdir away from)."""
    value = os.path.expanduser(value)
    if os.path.isabs(value):
        return value
    return os.path.normpath(os.path.join(folder, value))


def parse_duration(value: Any) -> float | None:
    """Seconds from a number or '90s', '10m', '2h', '30d'; None when it is neither."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    match = _DURATION.match(str(value).strip())
    if not match:
        return None
    return float(match.group(1)) * _DURATION_UNITS[match.group(2) or "s"]


_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?$")
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


def _duration(where: _Where, key: str, default: float) -> float:
    if key not in where.mapping:
        return default
    seconds = parse_duration(where.mapping[key])
    if seconds is None or seconds <= 0:
        raise where.fail(f"must be a duration such as 30s, 10m or 2h, not {where.mapping[key]!r}",
                         key)
    return seconds


def _positive(where: _Where, key: str, default: Any) -> Any:
    value = where.get(key, int, default=default)
    if value is not None and value < 1:
        raise where.fail(f"must be a positive integer, not {value!r}", key)
    return value


def _mode(where: _Where, default: str = "realtime") -> str:
    mode = where.get("mode", str, default=default)
    if mode not in ("realtime", "batch"):
        raise where.fail(f"must be 'realtime' or 'batch', not {mode!r}", "mode")
    return mode


def _batch_fallback(where: _Where, default: bool = False) -> bool:
    if "batch_fallback" not in where.mapping:
        return default
    value = where.mapping["batch_fallback"]
    if value not in (False, "realtime"):
        raise where.fail("must be 'realtime' (finish what a batch could not in realtime)",
                         "batch_fallback")
    return value == "realtime"


def _stage(path: Path, position: int, raw: Any, models: dict[str, ModelSpec],
           defaults: _StageDefaults, upstream: str) -> StageSpec:
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: stage #{position} must be a mapping with a name")
    where = _Where(path, raw, f"stage #{position}")
    name = where.get("name", str, required=True)
    where.context = f"stage {name!r}"
    if not _STAGE_NAME.match(name):
        raise where.fail("must be letters, digits, '_', '.' or '-' (it names a folder)", "name")
    kinds = [k for k in STAGE_KINDS if k in raw]
    if not kinds:
        where.check_keys(set().union(*_STAGE_KEYS.values()))
    if len(kinds) != 1:
        raise where.fail("needs exactly one of 'prompt' (LLM stage), 'filter' or 'python'"
                         + (f", not {' and '.join(kinds)}" if kinds else ""))
    kind = kinds[0]
    where.check_keys(_STAGE_KEYS[kind])
    line = getattr(raw, "line", 0)
    if kind != "python":
        from . import templates  # jinja2 costs ~80 ms to import: only when a stage needs it

    if kind == "filter":
        source = where.get("filter", str, required=True)
        try:
            templates.compile_expression(source)
        except templates.TemplateError as e:
            raise where.fail(f"does not compile: {e}", "filter") from None
        definition = {"filter": source, "up": upstream}
        return StageSpec(name=name, kind="filter", line=line, filter=source,
                         definition=definition, fingerprint=_digest(definition))

    if kind == "python":
        target = where.get("python", str, required=True)
        try:
            function = import_callable(target, import_paths(path))
        except ConfigError as e:
            raise where.fail(str(e), "python") from None
        definition = {"python": target, "source": _source_digest(function), "up": upstream}
        return StageSpec(name=name, kind="python", line=line, python=target,
                         definition=definition, fingerprint=_digest(definition))

    routes = _routes(where, models)
    if routes:  # the default route's cascade first: what batch mode and `status` name
        aliases = tuple(dict.fromkeys(routes[-1].models + tuple(
            a for route in routes for a in route.models)))
    else:
        aliases = _cascade(where, where.get("model", (str, list), default=defaults.model),
                           models, "model")
    system = where.get("system", str)
    prompt = where.get("prompt", str, required=True)
    for key, source in (("system", system), ("prompt", prompt)):
        if source is not None:
            try:
                templates.compile_template(source)
            except templates.TemplateError as e:
                line_hint = f" (template line {e.lineno})" if getattr(e, "lineno", None) else ""
                raise where.fail(f"template does not compile: {e.message}{line_hint}",
                                 key) from None
    parse = where.get("parse", str, default="text")
    if parse not in ("text", "json"):
        raise where.fail("must be 'text' or 'json'", "parse")
    output = where.get("output", str, default=name)
    fields = where.get("fields", str, default="nested")
    if fields not in ("nested", "spread"):
        raise where.fail("must be 'nested' (the reply in the `output` field) or 'spread' (a "
                         "JSON reply's keys as the record's fields)", "fields")
    if fields == "spread" and parse != "json":
        raise where.fail("'spread' needs parse: json", "fields")
    accept = where.get("accept", str)
    if accept is not None:
        try:
            templates.compile_expression(accept)
        except templates.TemplateError as e:
            raise where.fail(f"does not compile: {e}", "accept") from None
    schema = _schema(where, path.parent)
    if schema is not None and parse != "json":
        raise where.fail("a schema checks a JSON reply: needs parse: json", "schema")
    reask = where.get("reask", int, default=0)
    if reask < 0:
        raise where.fail("must be 0 or more", "reask")
    structured = where.get("structured", bool, default=False)
    if structured and schema is None:
        raise where.fail("asks the provider to hold replies to the `schema`: give one",
                         "structured")
    params = {**defaults.params, **where.get_json("params", {})}
    retries = where.get("retries", int, default=defaults.retries)
    if retries < 0:
        raise where.fail("must be 0 or more", "retries")
    outage_timeout = _duration(where, "outage_timeout", defaults.outage_timeout)
    cache, namespace = _stage_cache(where, defaults.cache)
    mode = _mode(where, defaults.mode)
    batch_fallback = _batch_fallback(where, defaults.batch_fallback)
    first = models[aliases[0]]
    if mode == "batch" and routes:
        raise where.fail("a stage with `route:` runs in realtime (batch mode sends a shard "
                         "to one model)", "mode")
    if mode == "batch" and not first.batch_api and not batch_fallback:
        raise where.fail(f"model {first.alias!r} has no batch API ({first.provider} at "
                         f"{first.base_url or 'in-process'}); set batch_api: true on the model "
                         "if its server has one, or batch_fallback: realtime", "mode")
    definition = {"models": [models[a].identity() for a in aliases], "system": system,
                  "prompt": prompt, "output": output, "parse": parse, "params": params,
                  "up": upstream}
    if namespace is not None:
        definition["cache_namespace"] = namespace  # a new namespace asks for new replies
    if routes:
        definition["route"] = [{"when": r.when, "models": [models[a].identity()
                                                           for a in r.models]} for r in routes]
    if fields == "spread":
        definition["fields"] = fields
    for key, value in (("accept", accept), ("schema", schema), ("reask", reask),
                       ("structured", structured)):
        if value:
            definition[key] = value
    return StageSpec(name=name, kind="llm", line=line, models=aliases, routes=routes,
                     spread=fields == "spread", accept=accept, schema=schema, reask=reask,
                     structured=structured,
                     system=system,
                     prompt=prompt, output=output, parse=parse, params=params, retries=retries,
                     outage_timeout=outage_timeout, cache=cache, cache_namespace=namespace,
                     prompt_cache=where.get("prompt_cache", bool, default=defaults.prompt_cache),
                     mode=mode, batch_fallback=batch_fallback,
                     batch_deadline=_duration(where, "batch_deadline",
                                              defaults.batch_deadline or 0.0) or None,
                     definition=definition, fingerprint=_digest(definition))


def _schema(where: "_Where", folder: Path) -> dict[str, Any] | None:
    """`schema:` inline, or `{file: x.json}` (JSON or YAML, beside the pipeline file),
    checked to be JSON Schema."""
    schema = where.get_json("schema", None)
    if schema is None:
        return None
    if set(schema) == {"file"} and isinstance(schema["file"], str):
        name = _beside(folder, schema["file"])
        try:
            text = Path(name).read_text()
            schema = yaml.safe_load(text) if name.endswith((".yaml", ".yml")) else json.loads(text)
        except (OSError, ValueError, yaml.YAMLError) as e:
            raise where.fail(f"cannot read {name}: {e}", "schema") from None
        if not isinstance(schema, dict):
            raise where.fail(f"{name} does not hold a JSON Schema object", "schema")
    import fastjsonschema  # ~35 ms: only for stages with a schema

    try:
        fastjsonschema.compile(schema)
    except Exception as e:  # JsonSchemaDefinitionException, or worse on nonsense
        raise where.fail(f"not a valid JSON Schema: {e}", "schema") from None
    return schema


def _cascade(where: "_Where", model: Any, models: dict[str, ModelSpec],
             key: str) -> tuple[str, ...]:
    """A `model:` value, an alias or a list of them, checked against `models:`."""
    aliases = (model,) if isinstance(model, str) else tuple(model or ())
    if not aliases or not all(isinstance(a, str) for a in aliases):
        raise where.fail("must be a model alias or a list of aliases", key)
    for alias in aliases:
        if alias not in models:
            raise where.fail(f"unknown model alias {alias!r}; known: {', '.join(models)}", key)
    return aliases


def _routes(where: "_Where", models: dict[str, ModelSpec]) -> tuple[Route, ...]:
    """`route:`: entries `{when: EXPR, model: ALIAS | [cascade]}`, the last without `when`."""
    raw = where.get("route", list)
    if raw is None:
        return ()
    if not raw:
        raise where.fail("must list at least one entry", "route")
    from . import templates

    routes = []
    for n, entry in enumerate(raw, 1):
        if not isinstance(entry, dict) or set(entry) - {"when", "model"} or "model" not in entry:
            raise where.fail(f"entry #{n} must be a mapping with `model` and, but for the "
                             "default, `when`", "route")
        when = entry.get("when")
        if when is not None:
            if not isinstance(when, str):
                raise where.fail(f"entry #{n}: `when` must be an expression (a string)", "route")
            try:
                templates.compile_expression(when)
            except templates.TemplateError as e:
                raise where.fail(f"entry #{n}: `when` does not compile: {e}", "route") from None
        elif n != len(raw):
            raise where.fail(f"entry #{n} has no `when` (the default) and must come last: the "
                             "ones after it would never be used", "route")
        routes.append(Route(when, _cascade(where, entry["model"], models, "route")))
    if routes[-1].when is not None:
        raise where.fail("needs a default: a last entry without `when`, for the records no "
                         "`when` holds for", "route")
    return tuple(routes)


def extra_stage(pipeline: Pipeline, raw: dict[str, Any], upstream: str) -> StageSpec:
    """A stage the pipeline file does not list (the test bench's judge), read by the same
    rules and `defaults:` as the ones it does; `upstream` goes into its fingerprint."""
    return _stage(pipeline.path, 0, raw, pipeline.models, pipeline.stage_defaults, upstream)


def check_api_keys(pipeline: Pipeline, stages: list[StageSpec]) -> None:
    """Refuse to start when a model the stages use has no key in its variable."""
    for stage in stages:
        for alias in stage.models:
            variable = pipeline.models[alias].api_key_env
            if variable and not os.environ.get(variable):
                raise ConfigError(f"{pipeline.path}: stage {stage.name!r}: model {alias!r}: "
                                  f"environment variable {variable} is not set (api_key_env); "
                                  "export it with the API key")


def import_paths(pipeline_path: Path) -> list[str]:
    """The current directory and the pipeline's folder, where `python:` stages are found."""
    return [str(Path.cwd()), str(pipeline_path.resolve().parent)]


def import_callable(target: str, search_paths: list[str]) -> Callable[..., Any]:
    """Import 'package.module:function'; raises ConfigError saying what is wrong."""
    module_name, _, attribute = target.partition(":")
    if not module_name or not attribute:
        raise ConfigError(f"{target!r} must look like 'module:function'")
    for entry in reversed(search_paths):
        if entry not in sys.path:
            sys.path.insert(0, entry)
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # a broken user module can raise anything on import
        raise ConfigError(f"cannot import {module_name!r}: {type(e).__name__}: {e}") from None
    function = getattr(module, attribute, None)
    if function is None:
        raise ConfigError(f"module {module_name!r} has no attribute {attribute!r}")
    if not callable(function):
        raise ConfigError(f"{target!r} is not callable")
    return function


def _source_digest(function: Callable[..., Any]) -> str:
    """Editing the module of a python stage makes the stage stale."""
    try:
        return _digest(inspect.getsource(inspect.getmodule(function)))
    except (OSError, TypeError):
        return ""


def _digest(value: Any) -> str:
    return hashlib.sha256(orjson.dumps(value, option=orjson.OPT_SORT_KEYS)).hexdigest()[:16]
