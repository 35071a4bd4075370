"""ppu_lab.data: the MNIST loader (10k sample, synthetic IDX files, damaged files), the
downloader against a local HTTP server (md5 check, mirror fallback, file lock across
processes), the offline error and the ``fetch`` CLI; and ``make_ridge_data``."""

from __future__ import annotations

import collections
import gzip
import hashlib
import multiprocessing as mp
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from ppu_lab import data
from ppu_lab.data import MNISTError, MNISTNotFoundError, load_mnist, make_ridge_data, mnist_dir, read_idx

ROOT = Path(__file__).resolve().parents[1]
NAMES = data.FILES  # train images, train labels, test images, test labels

# Label counts of the two MNIST sets the tests may meet: the 10k sample beside the repository
# (../shared/data/README.md) and the official full set, which a newcomer's clone downloads.
LABEL_COUNTS = {
    8000: ([773, 905, 834, 803, 788, 723, 756, 813, 787, 818], [207, 230, 198, 207, 194, 169, 202, 215, 187, 191]),
    60000: ([5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949],
            [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]),
}
TEST_SIZE = {8000: 2000, 60000: 10000}


# ----------------------------------------------------------------------------- helpers
def idx_bytes(arr: np.ndarray, type_code: int = 0x08, dtype: str = ">u1") -> bytes:
    """IDX encoding written independently of the package: magic, big-endian sizes, data."""
    header = struct.pack(">BBBB", 0, 0, type_code, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + np.asarray(arr).astype(dtype).tobytes()


def synthetic_mnist(n_train=30, n_test=12, seed=0):
    """Arrays and the four gzip files (name -> bytes) of a small fake MNIST."""
    rng = np.random.default_rng(seed)
    arrays = {
        NAMES[0]: rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        NAMES[1]: rng.integers(0, 10, n_train, dtype=np.uint8),
        NAMES[2]: rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        NAMES[3]: rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    arrays[NAMES[0]][0, 0, 0], arrays[NAMES[0]][0, 0, 1] = 0, 255
    files = {name: gzip.compress(idx_bytes(a), mtime=0) for name, a in arrays.items()}
    return arrays, files


def write_folder(folder: Path, files: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, blob in files.items():
        (folder / name).write_bytes(blob)
    return folder


def md5s(files: dict) -> dict:
    return {name: hashlib.md5(blob).hexdigest() for name, blob in files.items()}


def check_equal(loaded, arrays):
    x_train, y_train, x_test, y_test = loaded
    np.testing.assert_array_equal(x_train, arrays[NAMES[0]].astype(np.float32) / 255)
    np.testing.assert_array_equal(y_train, arrays[NAMES[1]])
    np.testing.assert_array_equal(x_test, arrays[NAMES[2]].astype(np.float32) / 255)
    np.testing.assert_array_equal(y_test, arrays[NAMES[3]])
    assert y_train.dtype == np.int64 and x_train.dtype == np.float32


def leftovers(folder: Path) -> list[str]:
    """Data or temporary files in a folder (the lock file does not count)."""
    return sorted(p.name for p in folder.iterdir() if p.name != data.LOCK_NAME)


# ----------------------------------------------------------------------------- fixtures
class Mirror:
    """A local HTTP server: ``serve(prefix, files)`` puts files under ``/prefix/``."""

    def __init__(self, url):
        self.url, self.routes, self.hits, self.delay = url, {}, collections.Counter(), 0.0
        self.lock = threading.Lock()

    def serve(self, prefix, files):
        for name, blob in files.items():
            self.routes[f"/{prefix}/{name}"] = blob
        return f"{self.url}/{prefix}/"


@pytest.fixture
def mirror(monkeypatch):
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    state = None

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            with state.lock:
                state.hits[self.path] += 1
            body = state.routes.get(self.path)
            if body is None:
                self.send_error(404)
                return
            time.sleep(state.delay)
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state = Mirror(f"http://127.0.0.1:{httpd.server_address[1]}")
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield state
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def refused_url():
    """A URL on a port where nothing listens (connection refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/mnist/"


@pytest.fixture
def fake(monkeypatch):
    """Synthetic MNIST whose md5 sums replace the official ones."""
    arrays, files = synthetic_mnist()
    monkeypatch.setattr(data, "MD5", md5s(files))
    return arrays, files


# ----------------------------------------------------------------------------- real data
def test_load_mnist_real_data(mnist_root):
    """The 10k sample or the full official set, whichever the tests found: shapes, range, labels."""
    x_train, y_train, x_test, y_test = load_mnist(mnist_root, download=False)
    assert len(x_train) in LABEL_COUNTS, f"neither the 10k sample nor the full MNIST: {len(x_train)} images"
    train_counts, test_counts = LABEL_COUNTS[len(x_train)]
    assert x_train.shape[1:] == x_test.shape[1:] == (28, 28) and len(x_test) == TEST_SIZE[len(x_train)]
    assert x_train.dtype == x_test.dtype == np.float32
    assert y_train.dtype == y_test.dtype == np.int64
    for x in (x_train, x_test):
        assert x.min() == 0.0 and x.max() == 1.0
        assert 0.11 < x.mean() < 0.15  # MNIST's mean pixel is about 0.13
    assert np.bincount(y_train, minlength=10).tolist() == train_counts
    assert np.bincount(y_test, minlength=10).tolist() == test_counts


def test_tests_find_mnist_where_load_mnist_does(tmp_path, mirror, fake, monkeypatch):
    """A newcomer's clone has no ../shared: the tests' MNIST comes from $PPU_LAB_DATA, else the
    default cache, else a download into that cache (here from a local mirror)."""
    from conftest import find_mnist

    arrays, files = fake
    monkeypatch.setattr(data, "MIRRORS", [mirror.serve("good", files)])
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("PPU_LAB_DATA", raising=False)
    cache = tmp_path / "home" / ".cache" / "ppu_lab" / "mnist"
    assert find_mnist() == cache  # downloaded, as `python -m ppu_lab.data fetch` would
    assert sum(mirror.hits.values()) == 4
    check_equal(load_mnist(cache, download=False), arrays)
    assert find_mnist() == cache and sum(mirror.hits.values()) == 4  # the filled cache is found, no download
    monkeypatch.setenv("PPU_LAB_DATA", str(write_folder(tmp_path / "env", files)))
    assert find_mnist() == tmp_path / "env"  # the variable comes first (CI points it at the sample)


def test_folder_order(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("PPU_LAB_DATA", raising=False)
    assert mnist_dir() == tmp_path / "home" / ".cache" / "ppu_lab" / "mnist"
    monkeypatch.setenv("PPU_LAB_DATA", str(tmp_path / "env"))
    assert mnist_dir() == tmp_path / "env"
    assert mnist_dir(tmp_path / "arg") == tmp_path / "arg"
    assert mnist_dir(str(tmp_path / "arg")) == tmp_path / "arg"


# ----------------------------------------------------------------------------- IDX files
def test_synthetic_idx_round_trips(tmp_path):
    rng = np.random.default_rng(1)
    cases = [
        (rng.integers(0, 256, (5, 28, 28), dtype=np.uint8), 0x08, ">u1"),
        (rng.integers(-1000, 1000, (3, 4), dtype=np.int16), 0x0B, ">i2"),
        (rng.standard_normal((2, 3, 4)).astype(np.float32), 0x0D, ">f4"),
        (rng.standard_normal(7), 0x0E, ">f8"),
    ]
    for i, (arr, code, dt) in enumerate(cases):
        blob = idx_bytes(arr, code, dt)
        (tmp_path / f"a{i}.gz").write_bytes(gzip.compress(blob))
        (tmp_path / f"a{i}.idx").write_bytes(blob)  # uncompressed IDX is read too
        for path in (tmp_path / f"a{i}.gz", tmp_path / f"a{i}.idx"):
            out = read_idx(path)
            assert out.dtype == arr.dtype and out.dtype.isnative
            np.testing.assert_array_equal(out, arr)


def test_load_mnist_on_synthetic_folder(tmp_path, monkeypatch):
    arrays, files = synthetic_mnist()
    write_folder(tmp_path / "m", files)
    check_equal(load_mnist(tmp_path / "m", download=False), arrays)
    monkeypatch.setenv("PPU_LAB_DATA", str(tmp_path / "m"))  # found through the variable
    check_equal(load_mnist(download=False), arrays)


def _truncate_gz(blob):
    return blob[: len(blob) // 2]


def _flip_gz(blob):
    b = bytearray(blob)
    for i in range(len(b) // 2, len(b) // 2 + 8):
        b[i] ^= 0xFF
    return bytes(b)


def _reidx(blob, fn):
    return gzip.compress(fn(gzip.decompress(blob)))


DAMAGE = {
    "truncated gzip": (0, _truncate_gz, "truncated gzip"),
    "corrupt gzip": (0, _flip_gz, "corrupt gzip"),
    "not gzip, not IDX": (2, lambda b: b"<html>404 not found</html>", "wrong magic"),
    "wrong magic (labels as images)": (0, lambda b: None, "wrong magic"),
    "truncated IDX data": (2, lambda b: _reidx(b, lambda r: r[:-100]), "truncated"),
    "truncated IDX header": (3, lambda b: _reidx(b, lambda r: r[:6]), "truncated"),
    "trailing bytes": (1, lambda b: _reidx(b, lambda r: r + b"\x00" * 3), "size mismatch"),
    "label out of range": (3, lambda b: _reidx(b, lambda r: r[:-1] + b"\x0c"), "out of range"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_damaged_file_names_the_file(tmp_path, case):
    arrays, files = synthetic_mnist()
    which, damage, reason = DAMAGE[case]
    name = NAMES[which]
    files[name] = damage(files[name])
    if files[name] is None:  # a labels file where the images belong
        files[name] = files[NAMES[1]]
    folder = write_folder(tmp_path, files)
    with pytest.raises(MNISTError, match=reason) as err:
        load_mnist(folder, download=False)
    msg = str(err.value)
    assert str(folder / name) in msg and "Delete it and fetch it again" in msg
    assert isinstance(err.value, ValueError)


def test_image_label_count_mismatch(tmp_path):
    arrays, files = synthetic_mnist()
    files[NAMES[1]] = gzip.compress(idx_bytes(arrays[NAMES[1]][:-1]))
    folder = write_folder(tmp_path, files)
    with pytest.raises(MNISTError, match="30 images but .* 29 labels") as err:
        load_mnist(folder, download=False)
    assert str(folder / NAMES[0]) in str(err.value) and str(folder / NAMES[1]) in str(err.value)


def test_offline_error_says_where_and_how(tmp_path, monkeypatch):
    monkeypatch.delenv("PPU_LAB_DATA", raising=False)
    arrays, files = synthetic_mnist()
    write_folder(tmp_path, {NAMES[0]: files[NAMES[0]]})  # one of four present
    with pytest.raises(MNISTNotFoundError) as err:
        load_mnist(tmp_path, download=False)
    msg = str(err.value)
    assert f"looked in {tmp_path}" in msg and "root argument" in msg
    assert all(name in msg for name in NAMES[1:]) and NAMES[0] + "," not in msg
    assert "python -m ppu_lab.data fetch --root DIR" in msg and "PPU_LAB_DATA" in msg
    assert "download=False" in msg and "$PPU_LAB_DATA (not set)" in msg
    assert leftovers(tmp_path) == [NAMES[0]]


# ----------------------------------------------------------------------------- download
def test_download_good(tmp_path, mirror, fake, monkeypatch):
    arrays, files = fake
    monkeypatch.setattr(data, "MIRRORS", [mirror.serve("good", files)])
    folder = tmp_path / "new" / "mnist"  # created on demand
    check_equal(load_mnist(folder), arrays)
    assert leftovers(folder) == sorted(NAMES)
    assert [(folder / n).read_bytes() for n in NAMES] == [files[n] for n in NAMES]
    assert all(mirror.hits[f"/good/{n}"] == 1 for n in NAMES)
    check_equal(load_mnist(folder), arrays)  # second call: no new download
    assert sum(mirror.hits.values()) == 4


def test_download_corrupt_is_rejected(tmp_path, mirror, fake, monkeypatch):
    arrays, files = fake
    bad = {n: b[:-1] + bytes([b[-1] ^ 1]) for n, b in files.items()}  # one bit off
    url = mirror.serve("bad", bad)
    monkeypatch.setattr(data, "MIRRORS", [url])
    with pytest.raises(MNISTNotFoundError) as err:
        load_mnist(tmp_path)
    msg = str(err.value)
    assert "md5 mismatch" in msg and url + NAMES[0] in msg and data.MD5[NAMES[0]] in msg
    assert "Two ways out" in msg and "PPU_LAB_DATA" in msg
    assert leftovers(tmp_path) == []  # nothing left behind, not even a temporary file


@pytest.mark.parametrize("first", ["404", "refused"])
def test_first_mirror_fails_second_succeeds(tmp_path, mirror, fake, refused_url, monkeypatch, first):
    arrays, files = fake
    dead = mirror.url + "/missing/" if first == "404" else refused_url
    monkeypatch.setattr(data, "MIRRORS", [dead, mirror.serve("good", files)])
    check_equal(load_mnist(tmp_path), arrays)
    assert all(mirror.hits[f"/good/{n}"] == 1 for n in NAMES)
    if first == "404":  # the first mirror really was asked for every file
        assert all(mirror.hits[f"/missing/{n}"] == 1 for n in NAMES)


def test_all_mirrors_fail_lists_what_was_tried(tmp_path, mirror, fake, refused_url, monkeypatch):
    monkeypatch.setattr(data, "MIRRORS", [mirror.url + "/missing/", refused_url])
    with pytest.raises(MNISTNotFoundError) as err:
        load_mnist(tmp_path / "d")
    msg = str(err.value)
    assert f"{mirror.url}/missing/{NAMES[0]}: HTTP Error 404" in msg
    assert f"{refused_url}{NAMES[0]}:" in msg and "refused" in msg.lower()
    assert "python -m ppu_lab.data fetch" in msg and "PPU_LAB_DATA" in msg
    assert leftovers(tmp_path / "d") == []


def _fetch_worker(url, md5, barrier, queue):
    """Runs in a spawned process (a fresh import of ppu_lab.data): set the test mirror and
    sums, wait for the other process, then load MNIST from $PPU_LAB_DATA (fetching it).
    Reports when its load started and ended (time.time: comparable across processes)."""
    data.MIRRORS, data.MD5 = [url], md5
    barrier.wait(timeout=60)
    start = time.time()
    try:
        x_train, y_train, x_test, y_test = load_mnist()
        queue.put(("ok", float(x_train.sum()), int(y_test.sum()), start, time.time()))
    except Exception as exc:  # report, do not hang the parent
        queue.put(("error", repr(exc), 0, start, time.time()))


def test_concurrent_processes_download_once(tmp_path, mirror, fake, monkeypatch):
    arrays, files = fake
    mirror.delay = 0.15  # each file takes a while, so the two fetches overlap
    url = mirror.serve("good", files)
    monkeypatch.setenv("PPU_LAB_DATA", str(tmp_path / "shared"))
    ctx = mp.get_context("spawn")  # never fork a process that runs a server thread
    barrier, queue = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_fetch_worker, args=(url, data.MD5, barrier, queue)) for _ in range(2)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    assert [r[0] for r in results] == ["ok", "ok"], results
    x_sum = float((arrays[NAMES[0]].astype(np.float32) / 255).sum())
    assert all(np.isclose(r[1], x_sum) and r[2] == int(arrays[NAMES[3]].sum()) for r in results)
    assert {n: mirror.hits[f"/good/{n}"] for n in NAMES} == dict.fromkeys(NAMES, 1)  # one download
    assert leftovers(tmp_path / "shared") == sorted(NAMES)
    # The two loads overlapped in time (each started before the other ended): one process waited
    # for the other's download on the lock, and neither read a half-written file.
    (_, _, _, start_a, end_a), (_, _, _, start_b, end_b) = results
    assert start_a < end_b and start_b < end_a, results
    assert max(end_a, end_b) - min(start_a, start_b) >= 4 * mirror.delay  # the download did take place


def test_concurrent_threads_download_once(tmp_path, mirror, fake, monkeypatch):
    arrays, files = fake
    mirror.delay = 0.05
    monkeypatch.setattr(data, "MIRRORS", [mirror.serve("good", files)])
    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda _: load_mnist(tmp_path), range(3)))
    for loaded in results:
        check_equal(loaded, arrays)
    assert sum(mirror.hits.values()) == 4


# ----------------------------------------------------------------------------- CLI
def test_cli_fetch_root(tmp_path, mirror, fake, capsys):
    arrays, files = fake
    url = mirror.serve("good", files)
    folder = tmp_path / "cluster"
    assert data.main(["fetch", "--root", str(folder), "--mirror", url, "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert str(folder) in out and "30 training and 12 test images" in out
    check_equal(load_mnist(folder, download=False), arrays)


def _run_cli(*args, env=None):
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "ppu_lab.data", *args], capture_output=True, text=True, env=full_env, timeout=60
    )


def test_cli_help_and_failure_without_traceback(tmp_path, refused_url, capsys):
    with pytest.raises(SystemExit) as done:
        data.main(["fetch", "--help"])
    assert done.value.code == 0 and "--root DIR" in capsys.readouterr().out
    proc = _run_cli("fetch", "--root", str(tmp_path / "x"), "--mirror", refused_url, "--no-progress")
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr and proc.stderr.startswith("error: MNIST not found")
    assert str(tmp_path / "x") in proc.stderr and "PPU_LAB_DATA" in proc.stderr
    assert refused_url + NAMES[0] in proc.stderr


# ----------------------------------------------------------------------------- ridge data
def test_make_ridge_data_statistics():
    n, d, noise = 40_000, 6, 0.3
    X, y, w_true = make_ridge_data(n, d, noise=noise, seed=3)
    assert X.shape == (n, d) and y.shape == (n,) and w_true.shape == (d,)
    r = y - X @ w_true  # the noise
    assert abs(r.mean()) < 5 * noise / np.sqrt(n)
    assert abs(r.std() / noise - 1) < 0.03
    assert abs(np.corrcoef(r, X[:, 0])[0, 1]) < 5 / np.sqrt(n)  # independent of X
    np.testing.assert_allclose(X.T @ X / n, np.eye(d), atol=0.05)  # well conditioned
    # least squares recovers w_true to within the noise level
    w_hat = np.linalg.lstsq(X, y, rcond=None)[0]
    assert np.linalg.norm(w_hat - w_true) < 5 * noise * np.sqrt(d / n)
    X0, y0, w0 = make_ridge_data(50, 3, noise=0.0, seed=7)
    np.testing.assert_allclose(y0, X0 @ w0, rtol=0, atol=1e-12)
    again = make_ridge_data(n, d, noise=noise, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip((X, y, w_true), again, strict=True))
    assert not np.array_equal(make_ridge_data(n, d, noise, seed=4)[0], X)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"n": 0, "d": 3}, "n"),
        ({"n": 2.5, "d": 3}, "n"),
        ({"n": "10", "d": 3}, "n"),
        ({"n": float("nan"), "d": 3}, "n"),
        ({"n": 10, "d": 0}, "d"),
        ({"n": 10, "d": None}, "d"),
        ({"n": 10, "d": 3, "noise": -0.1}, "noise"),
        ({"n": 10, "d": 3, "noise": float("inf")}, "noise"),
        ({"n": 10, "d": 3, "noise": "a"}, "noise"),
    ],
)
def test_make_ridge_data_bad_args(kwargs, name):
    with pytest.raises(ValueError, match=rf"^{name} \("):
        make_ridge_data(**kwargs)
