"""Transports: how bytes move between ranks.  Within a host, the C core over shared memory
(`ncl._native`, used by `ncl.comm.Communicator`); between hosts, MPI (`mpi.py`).
`ncl.hierarchical` composes the two."""
