"""Multi-process training on packed rows (torch.distributed).

* :mod:`packmask.distributed.context_parallel` — context parallelism: one long packed row split
  over several ranks, documents kept isolated, exact forward and backward.
"""
