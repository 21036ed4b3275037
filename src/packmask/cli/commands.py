"""``packmask demo`` and ``packmask verify``: thin wrappers that turn options into calls."""
from __future__ import annotations

from pathlib import Path

from .errors import EXIT_FAILED, CLIError
from .report import print_report

__all__ = ["cmd_demo", "cmd_verify", "resolve_device"]


def resolve_device(name: str | None):
    """``--device``: None for auto, else a ``torch.device`` that exists on this machine."""
    import torch

    if name in (None, "auto"):
        return None
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise CLIError(f"--device {name}: CUDA is not available on this machine",
                       "drop --device (CUDA is used when present) or pass --device cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise CLIError(f"--device {name!r} is not a torch device", "pass cpu, cuda or cuda:N") from None


def cmd_demo(args, console) -> int:
    from .demo import DemoConfig, run_demo

    config = DemoConfig(max_length=args.max_length, seed=args.seed, time_budget_s=args.time_budget,
                        heldout_documents=args.heldout)
    run_demo(steps=args.steps, out_dir=args.out_dir, device=resolve_device(args.device), config=config,
             console=console, show_progress=not args.no_progress)
    return 0


def _model_for_verify(spec: str, console):
    """A tiny random model of a transformers family, or a local model folder."""
    path = Path(spec)
    if path.exists():
        from ..verification import model_for  # the class its config names: BertModel, LlamaForCausalLM, ...

        console.print(f"loading {path} …")
        try:
            return model_for(str(path))
        except (OSError, ValueError) as error:
            first_line = str(error).strip().splitlines()[0]
            raise CLIError(f"could not load a model from {path}: {first_line}",
                           "point --model at a folder written by model.save_pretrained, or pass a family "
                           "name such as llama") from None
    import difflib

    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if spec not in CONFIG_MAPPING:
        close = difflib.get_close_matches(spec, list(CONFIG_MAPPING.keys()), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise CLIError(f"unknown model family {spec!r}: not a transformers model_type nor a local folder",
                       f"pass a model_type such as llama, mistral, qwen2, gemma2{hint}, or a path to a model folder")
    from ..verification import model_for  # encoders (bert, roberta, modernbert) get their base class

    console.print(f"building a tiny random {spec} from its config (no download) …")
    return model_for(spec)


def cmd_verify(args, console) -> int:
    model = _model_for_verify(args.model, console)  # first: a typo in --model is the likelier error
    from ..verification import verify

    forms = tuple(f.strip() for f in args.forms.split(",") if f.strip())
    report = verify(model, forms=forms, print_table=False)
    print_report(console, report)
    summary = getattr(report, "summary", None)
    if callable(summary):
        console.print(summary())
    return 0 if getattr(report, "passed", True) else EXIT_FAILED
