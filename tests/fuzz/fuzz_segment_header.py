"""Fuzzes what a rank reads when it attaches to a communicator's shared-memory segment
(native/segment.c, ncl_comm_create with rank > 0): the header and control blocks rank 0 wrote,
so any bytes another process of the user could put there.

Per input, a memfd of at most 1 MiB stands for rank 0's segment; the harness plays rank 0's door
(native/door.c: an abstract socket that hands the descriptor to a knock with the key's ticket)
and rank 1 of 2 attaches to it with a 0.05 s timeout.  Contract: ncl_comm_create returns NCL_OK
(the communicator is then destroyed) or an error status with a message, within the timeout (plus
slack for a busy host); the process never crashes; nothing is left in /dev/shm.

Input: byte 0 chooses, the rest is content.  The content is XORed onto the first KiB of each
4 KiB page of a real segment image (taken once, from a real rank 0), since the header and each
array of control blocks start a page: zeros leave the real segment, and a mutated byte changes
one field.  Byte 0, bit 0 clear: the magic word is restored, so that most inputs get past the
wait for it; bit 1 clear: the layout fields, so that they get past the layout check to the
attach and the CMA probe; bit 2 set: the file size is the next three bytes (below 1 MiB)
instead of the real segment's.
"""
import functools
import hashlib
import itertools
import os
import socket
import struct
import threading
import time

import atheris

from common import fuzz

with atheris.instrument_imports(include=["ncl"]):
    from ncl import bootstrap
    from ncl._native import ffi, lib, last_error

TIMEOUT = 0.05
SLACK = 0.5            # seconds a busy host may add to the timeout before we call it a hang
MAGIC = struct.pack("<I", 0x6E636C31)  # "ncl1": NCL_MAGIC, native/internal.h
LAYOUT = slice(4, 64)  # ncl_header's nranks .. p2p_off (native/internal.h): what the check compares
ERRORS = {lib.NCL_ERR_ARGUMENT, lib.NCL_ERR_SYSTEM, lib.NCL_ERR_TIMEOUT, lib.NCL_ERR_PEER, lib.NCL_ERR_MISMATCH,
          lib.NCL_ERR_STATE}
COUNTER = itertools.count()


def options(timeout: float):
    """The options of a 2-rank communicator with the smallest buffers: a segment of about 40 KiB."""
    opts = bootstrap.options(2, timeout=timeout)
    opts.staging_bytes = opts.p2p_bytes = 4096
    return opts


OPTIONS = options(TIMEOUT)


def key(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


def memfds(prefix: str) -> set:
    """This process's descriptors of memfds named `prefix` (what the C core's rank 0 holds)."""
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}").startswith(f"/memfd:{prefix}"):
                found.add(int(fd))
        except OSError:
            continue
    return found


@functools.lru_cache(maxsize=None)
def real_segment() -> bytes:
    """The segment as a real rank 0 leaves it for the others to attach: rank 0 of 2 sets it up
    in a thread while we read its memfd (until it stops changing), then rank 1 attaches for real
    so that both finish."""
    name = f"/ncl-fuzz{os.getpid()}-real"
    opts, comms, status = options(10.0), [ffi.new("ncl_comm **") for _ in range(2)], []
    before = memfds("ncl-segment")
    rank0 = threading.Thread(target=lambda: status.append(lib.ncl_comm_create(name.encode(), key(name).encode(), 0,
                                                                              2, opts, comms[0])))
    rank0.start()
    image, deadline = b"", time.monotonic() + 10
    while time.monotonic() < deadline:
        time.sleep(0.02)
        for fd in memfds("ncl-segment") - before:
            try:
                image, last = os.pread(fd, 1 << 24, 0), image
            except OSError:
                continue
        if image[:4] == MAGIC and image == last:
            break
    status.append(lib.ncl_comm_create(name.encode(), key(name).encode(), 1, 2, opts, comms[1]))
    rank0.join()
    assert status == [lib.NCL_OK] * 2 and image[:4] == MAGIC, f"no real segment to start from: {last_error()}"
    for comm in comms:
        lib.ncl_comm_destroy(comm[0])
    return image


def serve_door(door: socket.socket, fd: int, ticket: bytes) -> None:
    """Rank 0's door for one knock: the descriptor to the ticket's holder (native/door.c's answer)."""
    try:
        sock, _ = door.accept()
    except OSError:  # rank 1 never knocked
        return
    with sock:
        sock.settimeout(1)
        try:
            knock = sock.recv(36, socket.MSG_WAITALL)  # knock_msg: 32 ticket bytes, int32 rank
            admitted = knock[:32] == ticket
            socket.send_fds(sock, [struct.pack("i", 0 if admitted else 1)], [fd] if admitted else [])
        except OSError:
            pass


@atheris.instrument_func
def segment(data: bytes) -> bytes:
    """The segment file an input stands for (see the module's docstring)."""
    real = real_segment()
    control, content = (data[0], data[1:]) if data else (0, b"")
    size = int.from_bytes(content[:3].ljust(3, b"\0"), "little") % (1 << 20) if control & 4 else len(real)
    image = bytearray(real[:size].ljust(size, b"\0"))
    for page, at in enumerate(range(0, len(content), 1024)):
        start = page * 4096
        chunk = content[at:at + 1024][:max(0, size - start)]
        end = start + len(chunk)
        image[start:end] = (int.from_bytes(image[start:end], "little") ^ int.from_bytes(chunk, "little")).to_bytes(
            len(chunk), "little")
    if not control & 1:
        image[0:4] = MAGIC[:size]
    if not control & 2 and size >= LAYOUT.stop:
        image[LAYOUT] = real[LAYOUT]
    return bytes(image)


@atheris.instrument_func
def how_far(status: int, message: str) -> int:
    """How far into the attach an input got, as a chain of tests rather than a table so that each
    outcome is a branch of its own: the C core is not instrumented, so this is all libFuzzer
    learns of it (an outcome not listed here is simply not told apart)."""
    if status == lib.NCL_OK:
        return 9
    if "rank 0 did not create" in message:
        return 0
    if "bytes but this rank expects" in message:
        return 1
    if "without its header" in message:
        return 2
    if "laid out for other options" in message:
        return 3
    if "never attached" in message:
        return 4
    if "died" in message:
        return 5
    if "closed its communicator" in message:
        return 6
    if "aborted the group" in message:
        return 7
    if "CMA probe" in message:
        return 8
    return -1


def TestOneInput(data: bytes) -> None:
    name = f"/ncl-fuzz{os.getpid()}-{next(COUNTER)}"
    secret = key(name)
    fd = os.memfd_create("ncl-fuzz")
    door = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        os.write(fd, segment(data))
        door.bind(f"\0ncl-{secret[:32]}")
        door.listen(1)
        door.settimeout(TIMEOUT + SLACK)  # a rank 1 that never knocks (a stub in its place) ends the wait
        threading.Thread(target=serve_door, args=(door, fd, secret[32:].encode()), daemon=True).start()
        out = ffi.new("ncl_comm **")
        start = time.monotonic()
        status = lib.ncl_comm_create(name.encode(), secret.encode(), 1, 2, OPTIONS, out)
        took = time.monotonic() - start
        if status == lib.NCL_OK:
            lib.ncl_comm_destroy(out[0])
        assert took < TIMEOUT + SLACK, f"attaching took {took:.2f} s with a timeout of {TIMEOUT} s"
        assert status == lib.NCL_OK or status in ERRORS and last_error(), f"status {status}, message {last_error()!r}"
        how_far(status, last_error())
    finally:
        door.close()
        os.close(fd)


if __name__ == "__main__":
    fuzz(TestOneInput, [bytes(3073), b"\1", b"\2", b"\4\0\x90"])  # the first: the real segment, as it is
