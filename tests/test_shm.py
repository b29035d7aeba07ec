"""shm/: real POSIX shared memory in /dev/shm, no mocks. Each test uses its own name prefix and must leave
nothing behind under it."""
import gc
import json
import os
import secrets
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import posix_ipc
import pytest
import torch

import shm
from shm import SegmentName, ShmError, ShmExistsError, ShmNotFoundError, ShmSpaceError
from shm.segment import _open_exclusive
from tests.helpers import REPO, shm_names


@pytest.fixture
def prefix():
    """A name prefix of the test's own. Tests unlink what they made as they end; what a failed one leaves is unlinked
    here, and reported."""
    p = "ebtest" + secrets.token_hex(4)
    yield p
    left = shm_names(p)
    for n in left:
        shm.unlink_segment(n)
    assert not left, f"test left segments behind in {shm.SHM_DIR}: {left}"


def _run_py(code):
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": REPO})


# -- names -------------------------------------------------------------------------------------------------

def test_name_format_parse_round_trip():
    n = SegmentName.new(30.0, "eb")
    s = n.format()
    assert s.startswith(f"/eb.{os.getpid()}.") and len(n.token) == 16
    assert SegmentName.parse(s) == n and SegmentName.parse(s[1:]) == n
    assert SegmentName.parse(s, prefix="other") is None
    assert not n.expired() and n.expired(now=time.time() + 31)
    for bad in ["PostgreSQL.2732206904", "/eb.0.1.0123456789abcdef", "/eb.12.x.0123456789abcdef",
                "/eb.12.34.0123456789ABCDEF", "/eb.12.34.0123456789abcde", "/eb.12.34.0123456789abcdef.x", ""]:
        assert SegmentName.parse(bad) is None, bad
    with pytest.raises(ValueError):
        SegmentName.new(1.0, "e.b")


# -- create / attach / views -------------------------------------------------------------------------------

def _bytes(t):
    """The raw bytes of a tensor or array, as write_segment's parts take them."""
    return t.reshape(-1).view(torch.uint8).numpy() if isinstance(t, torch.Tensor) else np.ascontiguousarray(t)


def test_create_is_exclusive_and_names_its_creator(prefix):
    """(Its mode and size: test_write_segment_writes_parts_through_the_descriptor.)"""
    name = shm.write_segment(1000, 60, prefix)
    assert SegmentName.parse(name, prefix).pid == os.getpid()
    with pytest.raises(ShmExistsError):
        _open_exclusive(name)
    with pytest.raises(posix_ipc.ExistentialError):
        posix_ipc.SharedMemory(name, posix_ipc.O_CREX)
    # the failed exclusive create must not have removed or resized the existing segment
    with shm.attach_segment(name) as again:
        assert again.size == 1000
    shm.unlink_segment(name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_torch_round_trip_at_offsets(prefix, dtype):
    a = torch.randn(7, 5, dtype=dtype)
    b = torch.randn(3, 3584, dtype=dtype)
    off_b = 64 * ((a.numel() * a.element_size() + 63) // 64)
    size = off_b + b.numel() * b.element_size()
    name = shm.write_segment(size, 60, prefix, [(0, _bytes(a)), (off_b, _bytes(b))])
    with shm.attach_segment(name) as r:
        ra, rb = r.torch(0, (7, 5), dtype), r.torch(off_b, (3, 3584), dtype)
        assert ra.dtype == dtype and torch.equal(ra, a) and torch.equal(rb, b)  # bit-exact, no conversion
    shm.unlink_segment(name)


def test_numpy_round_trip_and_zero_copy(prefix):
    x = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    y = np.arange(10, dtype=np.int64)[::2]  # non-contiguous source
    name = shm.write_segment(200, 60, prefix, [(8, _bytes(x)), (104, _bytes(y)), (150, b"hello"),
                                               (160, _bytes(torch.arange(4, dtype=torch.int16)))])
    with shm.attach_segment(name) as r, shm.attach_segment(name, writable=True) as w:
        vx = r.numpy(8, (2, 3, 4), np.float32)
        np.testing.assert_array_equal(vx, x)
        np.testing.assert_array_equal(r.numpy(104, 5, "<i8"), y)
        assert bytes(r.numpy(150, 5, np.uint8)) == b"hello"
        np.testing.assert_array_equal(r.numpy(160, (2, 2), np.int16), [[0, 1], [2, 3]])
        assert not vx.flags.writeable
        with pytest.raises(ValueError):
            vx[0, 0, 0] = 1
        # zero copy: a write through a writable attach shows through the reader's existing view
        w.numpy(8, (2, 3, 4), np.float32)[1, 2, 3] = -5.0
        assert vx[1, 2, 3] == -5.0
        # a read-only attach's torch view is copy-on-write: in-place ops never reach the segment
        t = r.torch(8, (24,), torch.float32)
        t.add_(100.0)
        assert w.numpy(8, (24,), np.float32)[0] == 0.0 and t[0].item() == 100.0
        with pytest.raises(ValueError):
            r.numpy(190, 4, np.float32)  # past the end
    shm.unlink_segment(name)


def test_writable_attach_writes_through(prefix):
    name = shm.write_segment(16, 60, prefix)
    with shm.attach_segment(name.lstrip("/"), writable=True) as w:
        w.numpy(0, 2, np.float64)[:] = [1.5, 2.5]
        w.torch(0, 2, torch.float64).mul_(2)
    np.testing.assert_array_equal(np.frombuffer(shm.read_segment(name), np.float64), [3.0, 5.0])
    shm.unlink_segment(name)


def test_size_zero(prefix):
    name = shm.write_segment(0, 60, prefix, [(0, b"")])
    with shm.attach_segment(name) as r:
        assert r.size == 1 and r.torch(0, (0, 8), torch.float32).numel() == 0
        assert r.numpy(0, (0, 3584), np.float32).shape == (0, 3584)
        assert r.torch(0, (0, 3584), torch.bfloat16).shape == (0, 3584)
    shm.unlink_segment(name)
    empty = shm.write_segment(0, 60, prefix)  # an empty result, no parts, still gets a (1-byte) segment
    assert os.stat(Path(shm.SHM_DIR) / empty[1:]).st_size == 1
    shm.unlink_segment(empty)


def test_view_survives_unlink_and_close(prefix):
    data = torch.randn(4, 16, dtype=torch.bfloat16)
    name = shm.write_segment(data.numel() * 2, 60, prefix, [(0, _bytes(data))])
    r = shm.attach_segment(name)
    t, a = r.torch(0, (4, 16), torch.bfloat16), r.numpy(0, (4, 16), np.uint16)
    r2 = shm.attach_segment(name)
    t2 = r2.torch(0, (4, 16), torch.bfloat16)  # the only view of r2's mapping, a torch one
    r2.close()
    r.unlink()
    assert shm_names(prefix) == []
    r.close()
    r.close()  # idempotent
    gc.collect()
    assert torch.equal(t, data) and torch.equal(t2, data)
    np.testing.assert_array_equal(a, data.view(torch.int16).numpy().view(np.uint16))
    with pytest.raises(ShmError, match="closed"):
        r.numpy(0, 1, np.uint8)


def test_unlink_idempotent_and_attach_after_unlink(prefix):
    name = shm.write_segment(32, 60, prefix)
    assert shm.unlink_segment(name) is True
    assert not (Path(shm.SHM_DIR) / name[1:]).exists()
    assert shm.unlink_segment(name) is False  # already gone: not an error
    assert shm.unlink_segment(name.lstrip("/")) is False  # names with or without the leading slash
    with pytest.raises(ShmNotFoundError, match="not found"):
        shm.attach_segment(name)


# -- space -------------------------------------------------------------------------------------------------

def test_budget_refuses_and_leaves_nothing(prefix):
    with pytest.raises(ShmSpaceError, match=r"asked for 4096 bytes, 1000 free"):
        shm.write_segment(4096, 60, prefix, max_total_bytes=1000)
    assert shm_names(prefix) == []
    first = shm.write_segment(4096, 60, prefix, max_total_bytes=8192)
    with pytest.raises(ShmSpaceError, match=r"asked for 8192 bytes, 4096 free"):
        shm.write_segment(8192, 60, prefix, max_total_bytes=8192)
    assert shm_names(prefix) == [first[1:]]
    shm.unlink_segment(shm.write_segment(4096, 60, prefix, max_total_bytes=8192))  # exactly fits
    shm.unlink_segment(first)


def test_refusals_leave_nothing(prefix):
    st = os.statvfs(shm.SHM_DIR)
    more_than_free = st.f_bavail * st.f_frsize + (1 << 30)
    with pytest.raises(ShmSpaceError, match=f"asked for {more_than_free} bytes"):  # refused before creating
        shm.write_segment(more_than_free, 60, prefix)
    with pytest.raises(ShmSpaceError, match="free"):
        shm.write_segment(1 << 60, 60, prefix)
    with pytest.raises(ShmSpaceError, match="budget"):
        shm.write_segment(1 << 20, 60, prefix, [(0, b"x")], max_total_bytes=1 << 10)
    with pytest.raises(ValueError, match="outside"):
        shm.write_segment(8, 60, prefix, [(4, b"12345")])
    assert shm_names(prefix) == []


def test_failed_create_unlinks_half_made_segment(prefix):
    # A real failure: RLIMIT_FSIZE below the size makes tmpfs refuse with EFBIG (SIGXFSZ ignored).
    code = f"""
import resource, signal, shm
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))
try:
    shm.write_segment(1 << 20, 60, {prefix!r}, [(0, bytes(1 << 20))])
except shm.ShmSpaceError as e:
    print("ShmSpaceError:", e)
"""
    out = _run_py(code)
    assert out.returncode == 0, out.stderr
    assert "ShmSpaceError" in out.stdout and "1048576" in out.stdout, out.stdout
    assert shm_names(prefix) == []


# -- sweep -------------------------------------------------------------------------------------------------

def _orphan(prefix):
    """A segment whose creator process has exited without unlinking it."""
    out = _run_py(f"import shm; print(shm.write_segment(64, 3600, {prefix!r}))")
    assert out.returncode == 0, out.stderr
    name = out.stdout.strip()
    assert SegmentName.parse(name, prefix).pid != os.getpid()
    return name


def test_sweep_dead_expired_and_live(prefix):
    orphan = _orphan(prefix)
    expired = shm.write_segment(8, 60, prefix)
    live = shm.write_segment(8, 3600, prefix)
    init_owned = SegmentName(1, int((time.time() + 3600) * 1000), secrets.token_hex(8), prefix).format()
    foreign = f"/{prefix}.not-a-segment"
    for n in (init_owned, foreign):
        posix_ipc.SharedMemory(n, posix_ipc.O_CREX, mode=0o600, size=8).close_fd()
    assert shm.sweep(prefix, grace_s=3600) == []  # the orphan is younger than the grace period
    assert shm.sweep(prefix) == [orphan]
    assert sorted(shm.sweep(prefix, now=time.time() + 120)) == [expired]
    assert shm_names(prefix) == sorted(n[1:] for n in (init_owned, foreign, live))
    with shm.attach_segment(live) as r:  # untouched
        assert r.size == 8
    assert sorted(shm.sweep(prefix, now=time.time() + 7200)) == sorted([init_owned, live])
    shm.unlink_segment(foreign)  # never swept: not a segment name


def test_sweep_cli(prefix):
    orphan = _orphan(prefix)
    out = subprocess.run([sys.executable, "-m", "shm", "sweep", "--prefix", prefix], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [orphan] and "removed 1 segment" in out.stderr
    assert shm_names(prefix) == []


def test_torch_imported_lazily(prefix):
    out = _run_py("import sys, numpy as np, shm\n"
                  f"n = shm.write_segment(8, 5, {prefix!r}, [(0, np.ones(2, 'f4'))]); s = shm.attach_segment(n)\n"
                  "s.numpy(0, 2, 'f4'); s.unlink(); s.close(); print('torch' in sys.modules)")
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr


def test_read_segment_copies_the_bytes_without_mapping(prefix):
    data = np.random.default_rng().integers(0, 256, 3 * 4096 + 17, dtype=np.uint8)  # odd length, several pages
    name = shm.write_segment(data.nbytes, 60, prefix, [(0, data)])
    got = shm.read_segment(name.lstrip("/"))
    assert isinstance(got, bytearray) and bytes(got) == data.tobytes()
    got[0] ^= 0xFF  # our own memory: the segment is untouched
    assert bytes(shm.read_segment(name)) == data.tobytes()
    shm.unlink_segment(name)
    with pytest.raises(ShmNotFoundError, match="not found"):
        shm.read_segment(name)


def test_write_segment_writes_parts_through_the_descriptor(prefix):
    a = torch.randn(7, 33, dtype=torch.bfloat16)  # odd lengths: parts end off page and off cache line
    b = np.random.default_rng().integers(0, 256, 4096 * 2 + 5, dtype=np.uint8)
    off_b = 64 * ((a.numel() * 2 + 63) // 64)
    size = off_b + b.nbytes + 11  # a tail no part covers reads as zeros
    name = shm.write_segment(size, 60, prefix, [(0, _bytes(a)), (off_b, b)])
    st = os.stat(Path(shm.SHM_DIR) / name[1:])
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_size == size
    with shm.attach_segment(name) as r:
        assert torch.equal(r.torch(0, (7, 33), torch.bfloat16), a)
        assert np.array_equal(r.numpy(off_b, (b.nbytes,), np.uint8), b)
        assert not r.numpy(off_b + b.nbytes, (11,), np.uint8).any()
    assert bytes(shm.read_segment(name))[off_b:off_b + b.nbytes] == b.tobytes()
    shm.unlink_segment(name)


BAD_NAMES_CHILD = """
import json, sys
import shm
for name in json.loads(sys.argv[1]):
    for fn in (shm.read_segment, shm.attach_segment, shm.unlink_segment):
        try:
            fn(name)
            print(fn.__name__, repr(name), "no error")
        except shm.ShmError as e:
            print(fn.__name__, repr(name), "ShmError" if "is not a shared-memory segment name" in str(e) else e)
        except Exception as e:
            print(fn.__name__, repr(name), type(e).__name__, e)
"""


def test_a_name_no_segment_can_have_is_a_shm_error_before_posix_ipc_sees_it():
    """A NUL once crashed the process inside posix_ipc (SIGSEGV), a slash resolved as a path: in a child process,
    so that a crash fails this test rather than ending pytest."""
    names = ["/a\x00b", "/../../etc/passwd", "a/b", "", "/", "..", "/" + "x" * 256, "/a\ud800"]
    child = subprocess.run([sys.executable, "-c", BAD_NAMES_CHILD, json.dumps(names)], cwd=REPO,
                           capture_output=True, text=True, timeout=120)
    assert child.returncode == 0, f"died with {child.returncode}: {child.stderr[-2000:]}"
    lines = child.stdout.splitlines()
    assert len(lines) == 3 * len(names) and all(line.endswith(" ShmError") for line in lines), child.stdout
