"""Reference results: the full runs whose numbers the notebooks quote, committed under ``results/reference/``.

A notebook never quotes "on our quiet machine it took ..." from memory: it loads the reference run
(``load(name)``), quotes what the file holds, and draws the student's own run beside it. Each file
is one JSON object::

    {"name": ..., "recorded": "2026-12-02T23:00:00Z", "command": "how to reproduce it",
     "machine": {...machine()...}, "notes": "...", "records": [{...}, ...]}

``save(name, records, command=...)`` writes one (run the notebook or benchmark in full, then save);
``FIELDS`` names, per reference, the record fields the notebooks use: ``tests/test_reference.py``
checks that every committed file loads and that its records have them.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import time
from pathlib import Path

#: Where the committed reference files live (in the lab's checkout).
REFERENCE_DIR = Path(__file__).resolve().parents[1] / "results" / "reference"

#: name -> record fields the notebooks read (extend it when a notebook starts quoting a reference).
FIELDS: dict[str, tuple[str, ...]] = {}


def machine() -> dict:
    """What the numbers depend on: host, CPU, cores, memory, load, and the versions of the stack."""
    from importlib.metadata import PackageNotFoundError, version

    from ppu_lab.mpiexec import usable_cores

    def ver(pkg):
        try:
            return version(pkg)
        except PackageNotFoundError:
            return None

    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), cpu)
    except OSError:
        pass
    try:
        mem_gib = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        mem_gib = None
    try:
        from mpi4py import MPI

        mpi = " ".join(MPI.Get_library_version().strip().splitlines()[0].split())
    except Exception:  # noqa: BLE001 - no MPI is a fact worth recording, not an error
        mpi = None
    return {
        "hostname": socket.gethostname(), "cpu": cpu, "cores": os.cpu_count(), "cores_usable": usable_cores(),
        "memory_gib": mem_gib, "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "platform": platform.platform(), "python": platform.python_version(), "numpy": ver("numpy"),
        "torch": ver("torch"), "mpi4py": ver("mpi4py"), "mpi_library": mpi,
    }


def path(name: str) -> Path:
    return REFERENCE_DIR / f"{name}.json"


def save(name: str, records, *, command: str, notes: str = "", machine_info: dict | None = None) -> Path:
    """Write ``records`` (a list of JSON-able dicts) as the reference ``name``; return the file."""
    doc = {"name": name, "recorded": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "command": command,
           "machine": machine() if machine_info is None else machine_info, "notes": notes, "records": list(records)}
    REFERENCE_DIR.mkdir(parents=True, exist_ok=True)
    target = path(name)
    tmp = target.with_suffix(".json.part")
    tmp.write_text(json.dumps(doc, indent=1, sort_keys=True, allow_nan=True) + "\n")
    os.replace(tmp, target)
    return target


def load(name: str) -> dict:
    """The reference ``name`` as a dict (see the module docstring); FileNotFoundError names what exists."""
    target = path(name)
    if not target.exists():
        known = sorted(p.stem for p in REFERENCE_DIR.glob("*.json")) if REFERENCE_DIR.exists() else []
        raise FileNotFoundError(f"no reference result {name!r} in {REFERENCE_DIR}; there are: {known}")
    return json.loads(target.read_text())


def records(name: str) -> list[dict]:
    """The records of the reference ``name``."""
    return load(name)["records"]


def describe(name: str) -> str:
    """One line for a notebook: where and when the reference was measured."""
    doc = load(name)
    m = doc["machine"]
    load_avg = m.get("load_average") or [float("nan")]
    return (f"reference run '{name}' ({doc['recorded'][:10]}): {m.get('cpu') or 'unknown CPU'}, "
            f"{m.get('cores_usable')} usable cores, load {load_avg[0]:.1f} when it started; `{doc['command']}`")
