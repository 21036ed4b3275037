"""Train-step benchmark: packmask beside transformers' own packing paths (see packmask/bench.py).

    DIST=sft OUT=out python benchmarks/train_step.py     # GPU: 2 rows x 8192 tokens, TinyLlama-shaped
"""
from packmask.cli.bench import main

if __name__ == "__main__":
    main()
