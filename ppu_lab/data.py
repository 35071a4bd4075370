"""Data for the lab: MNIST (notebooks 05-07) and synthetic ridge problems (notebook 01).

MNIST
-----
``load_mnist()`` returns ``(x_train, y_train, x_test, y_test)`` from the four standard IDX
gzip files. The folder is, in order: the ``root`` argument, ``$PPU_LAB_DATA``, then
``~/.cache/ppu_lab/mnist`` (see ``mnist_dir``). Missing files are downloaded from
``MIRRORS`` (each file checked against the official md5 in ``MD5``), written to a temporary
file in the same folder and renamed only when the sum matches, under a file lock so that
several MPI ranks or notebooks starting together download once and never read a
half-written file.

On a cluster whose compute nodes have no internet, fetch ahead of time on a login node::

    python -m ppu_lab.data fetch --root /shared/mnist
    export PPU_LAB_DATA=/shared/mnist

Files already in a folder are not md5-checked (the lab's 10k test sample differs from the
official files); they are checked structurally: a truncated, corrupt or wrong-magic file
raises ``MNISTError`` naming the file, never returns garbage.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import hashlib
import os
import sys
import tempfile
import urllib.error
import urllib.request
import zlib
from pathlib import Path

import numpy as np

from ppu_lab.checks import integer

# Public mirrors of the official files, tried in order. Tests and users may replace the list
# (``ppu_lab.data.MIRRORS = [...]`` or ``fetch --mirror URL``).
MIRRORS = [
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
]

# md5 of the official compressed files (../shared/data/README.md). Checked on download only.
MD5 = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
FILES = tuple(MD5)  # train images, train labels, test images, test labels

ENV_VAR = "PPU_LAB_DATA"
DEFAULT_DIR = Path("~/.cache/ppu_lab/mnist")
LOCK_NAME = ".ppu_lab_mnist.lock"
TIMEOUT = 30.0  # seconds without data before a mirror is given up
LOCK_TIMEOUT = 900.0  # seconds to wait for another process's download

# IDX header: 0x00 0x00 <type> <ndim>, then ndim big-endian uint32 sizes.
_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_IMAGES_MAGIC, _LABELS_MAGIC = 0x00000803, 0x00000801


class MNISTError(ValueError):
    """A damaged or inconsistent MNIST file, or a failed download."""


class MNISTNotFoundError(MNISTError):
    """No copy of MNIST where the lab looked, and none could be downloaded."""


# ----------------------------------------------------------------------------- where
def _resolve(root=None) -> tuple[Path, str]:
    if root is not None:
        return Path(root).expanduser(), "the root argument"
    env = os.environ.get(ENV_VAR, "").strip()
    if env:
        return Path(env).expanduser(), f"${ENV_VAR}"
    return DEFAULT_DIR.expanduser(), "the default cache"


def mnist_dir(root=None) -> Path:
    """The folder MNIST is read from: ``root``, else ``$PPU_LAB_DATA``, else ``~/.cache/ppu_lab/mnist``."""
    return _resolve(root)[0]


def _missing(folder: Path) -> list[str]:
    return [name for name in FILES if not (folder / name).is_file()]


# ----------------------------------------------------------------------------- IDX
def _bad_file(path, reason: str) -> MNISTError:
    path = Path(path)
    return MNISTError(
        f"MNIST file {path} is unusable: {reason}. Delete it and fetch it again "
        f"(`python -m ppu_lab.data fetch --root {path.parent}`), or set {ENV_VAR} to a folder "
        "with good copies."
    )


def _parse_idx(path) -> tuple[int, np.ndarray]:
    """``(magic, array)`` from an IDX file, gzip-compressed or not; MNISTError when damaged."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise MNISTError(f"cannot read MNIST file {path}: {exc}") from exc
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except EOFError as exc:
            raise _bad_file(path, f"truncated gzip stream ({exc})") from exc
        except (OSError, zlib.error) as exc:  # BadGzipFile (CRC, header) is an OSError
            raise _bad_file(path, f"corrupt gzip data ({exc})") from exc
    if len(raw) < 4:
        raise _bad_file(path, f"truncated: {len(raw)} bytes, shorter than an IDX header")
    if raw[:2] != b"\x00\x00" or raw[2] not in _IDX_TYPES or raw[3] == 0:
        raise _bad_file(
            path,
            f"wrong magic number 0x{raw[:4].hex()} (neither gzip nor IDX; "
            "MNIST images start with 0x00000803, labels with 0x00000801)",
        )
    magic, ndim = int.from_bytes(raw[:4], "big"), raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise _bad_file(path, f"truncated: header needs {header} bytes, file has {len(raw)}")
    shape = tuple(int(s) for s in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_TYPES[raw[2]])
    want = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    have = len(raw) - header
    if have < want:
        raise _bad_file(path, f"truncated: header promises shape {shape} ({want} bytes), file holds {have}")
    if have > want:
        raise _bad_file(path, f"size mismatch: {have - want} bytes after the data of shape {shape}")
    array = np.frombuffer(raw, dtype, offset=header).reshape(shape)
    return magic, array.astype(dtype.newbyteorder("="))


def read_idx(path) -> np.ndarray:
    """The array stored in one IDX file (``.gz`` or not), in native byte order."""
    return _parse_idx(path)[1]


def _read_images(path) -> np.ndarray:
    magic, x = _parse_idx(path)
    if magic != _IMAGES_MAGIC:
        raise _bad_file(path, f"wrong magic number 0x{magic:08x}, expected 0x{_IMAGES_MAGIC:08x} (images)")
    if x.shape[1:] != (28, 28):
        raise _bad_file(path, f"images have shape {x.shape[1:]}, expected (28, 28)")
    out = x.astype(np.float32)  # (n, 28, 28)
    out /= 255.0
    return out


def _read_labels(path) -> np.ndarray:
    magic, y = _parse_idx(path)
    if magic != _LABELS_MAGIC:
        raise _bad_file(path, f"wrong magic number 0x{magic:08x}, expected 0x{_LABELS_MAGIC:08x} (labels)")
    if y.size and y.max() > 9:
        raise _bad_file(path, f"label {int(y.max())} out of range 0-9")
    return y.astype(np.int64)  # (n,)


# ----------------------------------------------------------------------------- download
@contextlib.contextmanager
def _folder_lock(folder: Path, timeout: float = LOCK_TIMEOUT):
    """Exclusive lock on ``folder/LOCK_NAME`` (the ``filelock`` package), across processes and threads."""
    from filelock import FileLock, Timeout

    lock_path = folder / LOCK_NAME
    lock = FileLock(lock_path, timeout=timeout)
    try:
        lock.acquire()
    except Timeout:
        raise MNISTError(f"timed out after {timeout:.0f} s waiting for another process's MNIST download "
                         f"(lock file {lock_path}); if no download is running, delete that file") from None
    except OSError as exc:
        raise MNISTError(f"cannot create the lock file {lock_path} to download MNIST: {exc}") from exc
    try:
        yield
    finally:
        lock.release()


def _progress(total, name, enabled):
    try:
        from tqdm import tqdm  # plain text bar: tqdm.auto wants ipywidgets in Jupyter
    except ImportError:  # pragma: no cover - tqdm is a dependency; stay usable without it
        return contextlib.nullcontext(None)
    return tqdm(total=total, unit="B", unit_scale=True, desc=name, disable=not enabled, leave=False)


def _download_one(url: str, dest: Path, md5: str, progress: bool) -> None:
    """Download ``url`` to ``dest`` via a temporary file renamed only when its md5 is ``md5``."""
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    try:
        digest = hashlib.md5()
        request = urllib.request.Request(url, headers={"User-Agent": "ppu_lab (python urllib)"})
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(request, timeout=TIMEOUT) as resp:
            total = resp.headers.get("Content-Length")
            with _progress(int(total) if total else None, dest.name, progress) as bar:
                while chunk := resp.read(1 << 16):
                    out.write(chunk)
                    digest.update(chunk)
                    if bar is not None:
                        bar.update(len(chunk))
        if digest.hexdigest() != md5:
            raise MNISTError(f"md5 mismatch: got {digest.hexdigest()}, expected {md5}")
        os.replace(tmp, dest)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _download_missing(folder: Path, mirrors, progress: bool) -> tuple[list[str], list[str]]:
    """Fetch the missing files; returns ``(downloaded, failures)`` (failures: 'url: reason')."""
    downloaded, failures = [], []
    for name in _missing(folder):
        for mirror in mirrors:
            url = mirror.rstrip("/") + "/" + name
            try:
                _download_one(url, folder / name, MD5[name], progress)
            except (MNISTError, OSError) as exc:  # URLError, HTTPError, timeouts are OSErrors
                failures.append(f"{url}: {exc}")
            else:
                downloaded.append(name)
                break
        else:
            break  # this file failed on every mirror: stop and report
    return downloaded, failures


def _not_found(folder: Path, source: str, missing, failures=None) -> MNISTNotFoundError:
    env = os.environ.get(ENV_VAR, "").strip()
    lines = [
        f"MNIST not found: the lab looked in {folder} (from {source}) and is missing {', '.join(missing)}.",
        f"Search order: the root argument, then ${ENV_VAR} ({env or 'not set'}), then {DEFAULT_DIR}.",
    ]
    if failures is None:
        lines.append("Download was not attempted (download=False).")
    else:
        lines.append("Download failed (it stops at the first file no mirror can supply); tried:")
        lines += [f"  {f}" for f in failures] or ["  (no mirrors configured)"]
    lines += [
        "Two ways out:",
        "  1. On a machine with internet, run `python -m ppu_lab.data fetch --root DIR`, then copy DIR "
        "here (or use that DIR directly if it is on a shared file system).",
        f"  2. Set {ENV_VAR} to a folder that holds the four files: export {ENV_VAR}=/path/to/mnist",
    ]
    return MNISTNotFoundError("\n".join(lines))


def fetch_mnist(root=None, *, mirrors=None, progress: bool = True) -> Path:
    """Make sure the four MNIST files are in ``mnist_dir(root)``, downloading what is missing.

    Safe to call from many processes at once: one downloads, the others wait and then find
    the files. Returns the folder. Raises ``MNISTNotFoundError`` listing every URL tried.
    """
    folder, source = _resolve(root)
    if not _missing(folder):
        return folder
    mirrors = list(MIRRORS if mirrors is None else mirrors)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MNISTError(f"cannot create the MNIST folder {folder} (from {source}): {exc}") from exc
    with _folder_lock(folder):
        if not _missing(folder):  # another process downloaded while we waited
            return folder
        _, failures = _download_missing(folder, mirrors, progress)
        missing = _missing(folder)
    if missing:
        raise _not_found(folder, source, missing, failures)
    return folder


def load_mnist(root=None, download: bool = True):
    """MNIST as ``(x_train, y_train, x_test, y_test)``.

    Images: float32, shape (n, 28, 28), in [0, 1]. Labels: int64, shape (n,), 0-9.
    The folder is ``root``, else ``$PPU_LAB_DATA``, else ``~/.cache/ppu_lab/mnist``; missing
    files are downloaded when ``download`` is true (see ``fetch_mnist``).
    """
    folder, source = _resolve(root)
    missing = _missing(folder)
    if missing:
        if not download:
            raise _not_found(folder, source, missing)
        fetch_mnist(root)
    paths = [folder / name for name in FILES]
    x_train, y_train = _read_images(paths[0]), _read_labels(paths[1])
    x_test, y_test = _read_images(paths[2]), _read_labels(paths[3])
    for x, y, px, py in ((x_train, y_train, *paths[:2]), (x_test, y_test, *paths[2:])):
        if len(x) != len(y):
            raise MNISTError(
                f"MNIST files disagree: {px} has {len(x)} images but {py} has {len(y)} labels. "
                f"Delete both and fetch them again (`python -m ppu_lab.data fetch --root {folder}`)."
            )
    return x_train, y_train, x_test, y_test


# ----------------------------------------------------------------------------- ridge
def make_ridge_data(n, d, noise=0.1, seed=0):
    """A synthetic regression problem y = X w_true + noise with a known ``w_true``.

    Rows of X are standard normal (well conditioned for n >> d); the noise is Gaussian with
    standard deviation ``noise``. Returns ``(X, y, w_true)`` with shapes (n, d), (n,), (d,).
    """
    n = integer("n (number of samples)", n, 1)
    d = integer("d (number of features)", d, 1)
    try:
        ok = bool(np.isfinite(noise) and noise >= 0)
    except TypeError:
        ok = False
    if not ok:
        raise ValueError(f"noise (standard deviation) must be finite and >= 0; got {noise!r}")
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d))  # (n, d)
    w_true = rng.standard_normal(d)  # (d,)
    y = X @ w_true + noise * rng.standard_normal(n)  # (n,)
    return X, y, w_true


# ----------------------------------------------------------------------------- CLI
def main(argv=None) -> int:
    """``python -m ppu_lab.data fetch [--root DIR]``: download MNIST ahead of time."""
    parser = argparse.ArgumentParser(
        prog="python -m ppu_lab.data",
        description="PPU Lab data. Fetch MNIST ahead of time, e.g. on a login node for compute "
        f"nodes without internet, then point ${ENV_VAR} at the folder.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    fetch = sub.add_parser("fetch", help="download the four MNIST files (md5-checked)")
    fetch.add_argument(
        "--root",
        metavar="DIR",
        help=f"folder to fetch into (default: ${ENV_VAR} if set, else {DEFAULT_DIR})",
    )
    fetch.add_argument(
        "--mirror",
        action="append",
        metavar="URL",
        help="base URL to try instead of the built-in mirrors (repeatable, tried in order)",
    )
    fetch.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)

    try:
        folder = fetch_mnist(args.root, mirrors=args.mirror, progress=not args.no_progress)
        x_train, _, x_test, _ = load_mnist(folder, download=False)
    except MNISTError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"MNIST is in {folder}: {len(x_train)} training and {len(x_test)} test images.")
    if args.root is not None and mnist_dir() != folder.expanduser():
        print(f"To use it: export {ENV_VAR}={folder.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
