"""Exceptions of the group.  Bad arguments raise the builtin ValueError / TypeError before
any rank communicates; what goes wrong between ranks raises an NclError subclass."""


class NclError(RuntimeError):
    """A collective failed for the group (base class of every ncl failure)."""


class NclTimeoutError(NclError, TimeoutError):
    """A peer did not arrive before the deadline; the message names the missing ranks."""


class NclPeerError(NclError):
    """A peer died, aborted or closed its communicator while this rank waited for it."""


class NclMismatchError(NclError):
    """Ranks called different collectives, or the same one with different arguments."""


class NclSystemError(NclError, OSError):
    """The operating system refused something (shared memory, mapping)."""


class NclStateError(NclError):
    """The communicator is closed, or unusable after an earlier error."""
