"""Data around the core: packing datasets into rows, the collator, and the packed loss."""
