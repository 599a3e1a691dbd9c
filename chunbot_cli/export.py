"""The pipeline's `output:` file: what is refused before a run starts (an output the input
reads, a path that cannot be written), so a mistake costs nothing instead of a whole run;
and the leftovers of an export a crash cut short.

The export itself is `Workdir.export` (it reads the committed parts); whether the file
still holds what the shards do is `state.Export`.
"""

from __future__ import annotations

import fnmatch
import glob
import itertools
import os
from pathlib import Path

from .config import ConfigError, Pipeline
from .store import TEMP_MARK, describe


def check_output(pipeline: Pipeline, files: list[str]) -> None:
    """Refuse (ConfigError) an `output:` the input reads or that cannot be written."""
    output = pipeline.output
    if output is None:
        return
    if _read_by_input(output, pipeline.input, files):
        raise ConfigError(f"{pipeline.path}: output {str(output)!r} is read by the input "
                          f"{pipeline.input!r}: writing it would overwrite the input (or be "
                          "read back as input by the next run); give the output another "
                          "path or folder")
    problem = _unwritable(output)
    if problem:
        raise ConfigError(f"{pipeline.path}: output {str(output)!r} cannot be written: "
                          f"{problem}")


def _read_by_input(output: Path, spec: str | None, files: list[str]) -> bool:
    """Whether the input (`spec`, resolved to `files`) reads `output`, now or once it
    exists."""
    if spec is None or spec == "-":
        return False
    target = os.path.realpath(output)
    if any(name != "-" and os.path.realpath(name) == target for name in files):
        return True
    if not output.name.endswith((".jsonl", ".jsonl.zst", ".ndjson")):
        return False
    if glob.has_magic(spec):
        return _glob_matches(spec, target)
    folder = os.path.realpath(spec)
    return os.path.isdir(folder) and target.startswith(folder.rstrip(os.sep) + os.sep)


def _glob_matches(spec: str, target: str) -> bool:
    """Whether the glob `spec` would match `target`: part by part when it has no `**`
    (as glob reads it), else anywhere below the folder before the first wildcard with a
    name the last part matches."""
    pattern = os.path.realpath(spec).split(os.sep)
    parts = target.split(os.sep)
    if "**" not in spec:
        return len(parts) == len(pattern) and all(map(fnmatch.fnmatch, parts, pattern))
    fixed = os.sep.join(itertools.takewhile(lambda part: not glob.has_magic(part), pattern))
    last = pattern[-1] if pattern[-1] != "**" else "*"
    return target.startswith(fixed + os.sep) and fnmatch.fnmatch(parts[-1], last)


def _unwritable(output: Path) -> str | None:
    """Why `output` cannot be written (its folder made, a temp file created there and
    renamed over it, as the export does), or None; leaves nothing behind."""
    if output.is_dir():
        return "it is a folder"
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        probe = output.with_name(f".{output.name}{TEMP_MARK}{os.getpid()}")
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        return describe(e)
    return None


def remove_orphan_temp_files(path: Path) -> None:
    """Remove the temp files that writes of `path` killed half-way left beside it (an
    export of 190 MB killed before its rename), unless their writer still runs."""
    for temp in path.parent.glob(f".{glob.escape(path.name)}{TEMP_MARK}*"):
        pid = temp.name.rpartition(TEMP_MARK)[2]
        if pid.isdigit() and int(pid) != os.getpid() and _running(int(pid)):
            continue
        temp.unlink(missing_ok=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
