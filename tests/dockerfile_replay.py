"""Replay a Dockerfile's build without a Docker engine, the way the image would build.

Each stage gets a directory standing for its root filesystem and a fresh virtual environment
standing for the base image's Python. ``COPY`` takes files from a clean export of the repository
(tracked files only, so an untracked file cannot hide a missing ``COPY``) or from an earlier
stage; ``RUN`` commands are executed with their absolute paths mapped into the stage's root.
Only the commands this project's Dockerfile uses are understood; anything else fails loudly, so
the replay never silently skips a step the real build would run.

Run ``python -m tests.dockerfile_replay`` to print the replayed build's wall time and size.
"""

from __future__ import annotations

import glob
import os
import shlex
import shutil
import subprocess
import sys
import time
import venv
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from dockerfile_parse import DockerfileParser

REPO = Path(__file__).resolve().parent.parent


class ReplayError(Exception):
    """The Dockerfile uses something the replay cannot do faithfully."""


@dataclass
class Stage:
    """One ``FROM`` stage: its root directory, its Python and what the Dockerfile set."""

    name: str
    base: str
    root: Path
    python: Path
    workdir: PurePosixPath = PurePosixPath("/")
    env: dict[str, str] = field(default_factory=dict)
    user: str = "0"
    cmd: list[str] = field(default_factory=list)
    healthcheck: list[str] = field(default_factory=list)
    exposed: list[str] = field(default_factory=list)

    def host_path(self, container_path: str | PurePosixPath) -> Path:
        """Where a path inside this stage's container lives on the host."""
        path = PurePosixPath(container_path)
        if not path.is_absolute():
            path = self.workdir / path
        return self.root / str(path).lstrip("/")

    @property
    def bin(self) -> Path:
        return self.python.parent


def export_repository(destination: Path) -> None:
    """The build context: the repository's tracked files, as ``git archive`` would give them,
    with the working tree's contents (so uncommitted edits to tracked files are tested)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z"], cwd=REPO, check=True, capture_output=True
    ).stdout
    for name in filter(None, listed.decode().split("\0")):
        source = REPO / name
        if not source.is_file():
            continue  # deleted in the working tree
        target = destination / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)


def replay(dockerfile: Path, context: Path, work: Path) -> list[Stage]:
    """Build every stage of ``dockerfile`` from ``context`` under ``work`` (the last: the image)."""
    parser = DockerfileParser(path=str(dockerfile))
    stages: list[Stage] = []
    for instruction in parser.structure:
        kind, value = instruction["instruction"], instruction["value"]
        if kind == "COMMENT":
            continue
        if kind == "FROM":
            stages.append(_new_stage(value, len(stages), work))
            continue
        if not stages:
            raise ReplayError(f"{kind} before FROM")
        stage = stages[-1]
        if kind == "WORKDIR":
            stage.workdir = stage.workdir / value
            stage.host_path(stage.workdir).mkdir(parents=True, exist_ok=True)
        elif kind == "ENV":
            stage.env.update(_env_pairs(value))
        elif kind == "COPY":
            _copy(stage, value, context, stages)
        elif kind == "RUN":
            _run(stage, value)
        elif kind == "USER":
            stage.user = value.strip()
        elif kind == "CMD":
            stage.cmd = _exec_form(value, "CMD")
        elif kind == "HEALTHCHECK":
            stage.healthcheck = _exec_form(value.partition("CMD")[2], "HEALTHCHECK CMD")
        elif kind == "EXPOSE":
            stage.exposed += value.split()
        elif kind in ("VOLUME", "LABEL", "ARG"):
            continue  # metadata only
        else:
            raise ReplayError(f"the replay does not know {kind}: teach {__name__}")
    return stages


def _new_stage(value: str, index: int, work: Path) -> Stage:
    words = value.split()
    base = words[0]
    if not base.startswith("python:"):
        raise ReplayError(f"only python base images can be replayed, not {base}")
    name = words[2] if len(words) == 3 and words[1].lower() == "as" else str(index)
    root = work / f"stage-{index}"
    root.mkdir(parents=True)
    # The base image's interpreter: a fresh virtual environment, with nothing but pip.
    venv.EnvBuilder(with_pip=True, clear=True).create(root / "python")
    return Stage(name=name, base=base, root=root, python=root / "python" / "bin" / "python")


def _env_pairs(value: str) -> dict[str, str]:
    pairs: dict[str, str] = {}
    for word in shlex.split(value):
        key, sep, val = word.partition("=")
        if not sep:
            raise ReplayError(f"ENV {value!r}: use the KEY=value form")
        pairs[key] = val
    return pairs


def _exec_form(value: str, what: str) -> list[str]:
    import json

    try:
        words = json.loads(value.strip())
    except ValueError as exc:
        raise ReplayError(f"{what} must use the exec (JSON) form") from exc
    if not (isinstance(words, list) and all(isinstance(word, str) for word in words)):
        raise ReplayError(f"{what} must be a JSON list of strings")
    return list(words)


def _copy(stage: Stage, value: str, context: Path, stages: list[Stage]) -> None:
    words = value.split()
    source_root: Path | Stage = context
    while words and words[0].startswith("--"):
        flag, _, argument = words.pop(0).partition("=")
        if flag == "--from":
            found = [s for s in stages if s.name == argument]
            if not found:
                raise ReplayError(f"COPY --from={argument}: no such stage")
            source_root = found[0]
        elif flag != "--chown":
            raise ReplayError(f"COPY {flag} is not replayed")
    *sources, destination = words
    into = stage.host_path(destination)
    for source in sources:
        if isinstance(source_root, Stage):
            origin = source_root.host_path(source)
        else:
            origin = context / source
        if not origin.exists():
            raise ReplayError(f"COPY {source}: not in the build context")
        if origin.is_dir():
            shutil.copytree(origin, into, dirs_exist_ok=True)
        else:
            target = into / origin.name if destination.endswith("/") else into
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(origin, target)


def _run(stage: Stage, value: str) -> None:
    for command in value.split("&&"):
        words = shlex.split(command)
        if not words:
            continue
        program, arguments = words[0], words[1:]
        if program in ("useradd", "groupadd", "chown"):
            continue  # users and ownership: the test runs as whoever runs the tests
        if program == "chmod":
            mode, *paths = arguments
            for path in paths:
                stage.host_path(path).chmod(int(mode, 8))
        elif program == "mkdir":
            for path in (a for a in arguments if not a.startswith("-")):
                stage.host_path(path).mkdir(parents=True, exist_ok=True)
        elif program == "rm":
            for path in (a for a in arguments if not a.startswith("-")):
                shutil.rmtree(stage.host_path(path), ignore_errors=True)
        elif program == "pip":
            mapped = [_map_argument(stage, argument) for argument in arguments]
            subprocess.run(
                [str(stage.python), "-m", "pip", *mapped],
                cwd=stage.host_path(stage.workdir),
                env=_environment(stage, registry="--no-index" not in arguments),
                check=True,
            )
        else:
            raise ReplayError(f"the replay does not know RUN {program}: teach {__name__}")


def _map_argument(stage: Stage, argument: str) -> str:
    """Map absolute container paths (also in ``--flag=/path``) and expand globs, as sh would."""
    flag, sep, path = argument.partition("=") if argument.startswith("--") else ("", "", argument)
    if not path.startswith("/"):
        return argument
    mapped = str(stage.host_path(path))
    if any(char in mapped for char in "*?["):
        matches = glob.glob(mapped)
        if len(matches) != 1:
            raise ReplayError(f"{argument} matches {len(matches)} files, not one")
        mapped = matches[0]
    return f"{flag}{sep}{mapped}"


def _environment(stage: Stage, registry: bool = False) -> dict[str, str]:
    """A clean environment: the stage's ENV and its Python first on PATH, nothing inherited
    from the developer's shell that could change what the gateway reads (NBIA_PROXY_*).

    ``registry``: pip may reach the package index, configured as on this machine (the real
    build reaches PyPI). Without it pip sees no configuration at all, so a ``--no-index``
    install cannot quietly find wheels that the machine's pip.conf points at.
    """
    keep = {k: v for k, v in os.environ.items() if k in ("HOME", "LANG", "TMPDIR")}
    if registry:
        keep.update({k: v for k, v in os.environ.items() if k.startswith("PIP_")})
    else:
        keep["PIP_CONFIG_FILE"] = os.devnull
    path = f"{stage.bin}{os.pathsep}/usr/bin{os.pathsep}/bin"
    return {**keep, **stage.env, "PATH": path}


def image_environment(stage: Stage, **overrides: str) -> dict[str, str]:
    """The environment the image's ``CMD`` runs with, container paths mapped, plus overrides."""
    env = _environment(stage)
    for name, value in list(env.items()):
        if name.startswith("NBIA_PROXY_") and value.startswith("/"):
            env[name] = str(stage.host_path(value))
    return {**env, **overrides}


def installed_size(stage: Stage) -> int:
    """Bytes installed into the stage's Python (what the image adds to its base)."""
    total = 0
    for directory, _, files in os.walk(stage.python.parent.parent):
        for name in files:
            path = Path(directory) / name
            if not path.is_symlink():
                total += path.stat().st_size
    return total


def main() -> int:
    import tempfile

    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        context = Path(tmp) / "context"
        export_repository(context)
        stages = replay(REPO / "Dockerfile", context, Path(tmp) / "build")
        seconds = time.perf_counter() - started
        size = installed_size(stages[-1])
        base = installed_size(_new_stage("python:base", 99, Path(tmp)))
    print(f"replayed build: {seconds:.1f} s wall time")
    print(f"image-equivalent install: {size / 1e6:.1f} MB ({(size - base) / 1e6:.1f} MB over the")
    print(f"  bare interpreter's {base / 1e6:.1f} MB of pip and setuptools)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
