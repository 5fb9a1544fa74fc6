"""A job's identity and the names of its shared memory: what the communicators create and what
ncl-run removes after a crash.  Standard library only: the launcher imports it too."""
import hashlib
import secrets

MAX_RANKS = 1024  # ranks in one group: the C core's NCL_MAX_RANKS (native/ncl.h; tests/test_launch.py pins them equal)


def get_unique_id() -> str:
    """A fresh secret id for a new job (128 random bits, hex); share it with every rank."""
    return secrets.token_hex(16)


def shm_prefix(unique_id: str) -> str:
    """Name prefix (in /dev/shm) of every shared-memory segment of the job `unique_id`."""
    return f"ncl-{unique_id[:12]}-"


def segment_name(unique_id: str, label: str) -> str:
    """Name of a communicator's rendezvous note in /dev/shm (rank 0's pid while ranks join; the
    segment itself has no name): the job's prefix (so that ncl-run can clean up after a crash)
    plus a digest of the secret id, so that nobody can guess it."""
    digest = hashlib.sha256(f"{unique_id}/{label}".encode()).hexdigest()[:32]
    return "/" + shm_prefix(unique_id) + digest


def segment_key(unique_id: str, label: str) -> str:
    """A communicator's key (64 hex): the name of the socket that hands its segment to its ranks,
    and the ticket they show there (native/door.c).  Not derivable from the note's name."""
    return hashlib.sha256(f"{unique_id}/{label}/key".encode()).hexdigest()
