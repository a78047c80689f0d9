"""Open MPI bandwidth between ranks 0 and 1: eight messages of each size
from rank 0 to rank 1, then a one-byte reply; the best of five timings per
size. Rank 0 prints `MBps SIZE RATE` lines (MB/s). Used by
benches/share.sh and the shared-container scenario (tests/scenarios/share.rs)."""
import time

from mpi4py import MPI

c = MPI.COMM_WORLD
r = c.Get_rank()
ack = bytearray(1)
for n in [256 << 10, 1 << 20, 4 << 20, 64 << 20]:
    b = bytearray(n)
    best = 0.0
    for rep in range(6):
        c.Barrier()
        t = time.perf_counter()
        for i in range(8):
            if r == 0:
                c.Send([b, MPI.BYTE], dest=1)
            else:
                c.Recv([b, MPI.BYTE], source=0)
        if r == 0:
            c.Recv([ack, MPI.BYTE], source=1)
        else:
            c.Send([ack, MPI.BYTE], dest=0)
        dt = time.perf_counter() - t
        if rep > 0:  # the first round warms up
            best = max(best, 8 * n / dt / 1e6)
    if r == 0:
        print("MBps", n, round(best))
