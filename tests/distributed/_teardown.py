"""How the multi-process test workers (and benchmarks) end: together, and without interpreter teardown."""
import os
import sys


def finish_process(code: int = 0) -> None:
    """Tear the process group down together (a rank leaving early can abort gloo), then exit without
    interpreter teardown, where a C++ thread of the runtime occasionally aborts the process
    ("terminate called without an active exception", ~1 run in 15 on CPU) after the work succeeded."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
