"""Data around the core: packing datasets into rows, tree packing, chat data, the collators, the loss.

``spans`` (offsets, span indices, boundary forms in numpy: the twin of :mod:`packmask.segments`) is
under everything. Packing: ``binpack`` (numba row assignment) and ``binpack_python`` (its numpy twin
for a process's first call, chosen in ``kernel_choice``) -> ``assignment`` (:func:`pack_lengths`) ->
``arrow`` (moving token spans of Arrow buffers) and ``hf_datasets`` (the ``datasets`` adapter) ->
``packing`` (:func:`pack_dataset`; ``PackingStats`` from ``packing_stats``) and ``streaming``
(:func:`pack_iterable`). Trees: ``tree`` (forests) -> ``token_columns`` and ``branch_forest``
(prompt + responses) -> ``preference`` (:func:`pack_preference`, :func:`pack_groups`) ->
``tree_collator`` and ``logps``. ``chat`` and ``preference_chat`` tokenise conversations; ``threads``
and ``numba_cache`` keep numba's thread pool and on-disk cache in line; ``collator``; ``loss``.
"""
