"""Vision-language train step: packmask's MultimodalCollator beside padded batches and transformers'
own flattening, one run, same samples.

Model: Qwen2.5-VL-shaped -- a small vision tower (4 blocks, 512 wide, windowed like Qwen2.5-VL) and
an 8-layer 2048-hidden text decoder (16 heads, 4 kv heads, mRoPE). Data: samples with 0-4 images of
64-1024 image tokens each and text of median ~300 tokens, filled in order into 2 rows x 8192 tokens.
Methods (forward + backward of the same samples):

  packmask        MultimodalCollator rows on attn_implementation="packmask" ([4, B, L] positions,
                  the text row read as the layout: varlen kernels, no [N, N] mask), the vision tower
                  in one varlen call per layer (packmask.multimodal.varlen_vision)
  packmask_vision_loop   the same, the vision tower in its stock loop (one call per image / window)
  padded_sdpa     one padded row per sample (2D attention_mask) on sdpa: what TRL does today
  flatten_sdpa    the same packed rows on sdpa: transformers' own packed path ([4, B, L] position ids,
                  no mask, use_cache=False; it builds a block mask per row)

Reports real (non-pad) tokens/s, step time (first call beside the warm median), peak memory, and
checks each packed method's logits against the padded run (each sample alone) -- and that the rows
run as one sequence (no per-sample positions) differ, so the check can fail. Exits 1 on a failed check.

    python benchmarks/vlm.py --out results/                 # GPU (bf16): 2 rows x 8192 tokens
    python benchmarks/vlm.py --tiny --device cpu            # seconds on a CPU (fp32, tiny sizes)
"""
import argparse
import datetime
import math
import os
import statistics
import sys
import time

import torch
import transformers

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import packmask  # noqa: E402
from packmask.multimodal import MultimodalCollator, varlen_vision  # noqa: E402
from _report import finish  # noqa: E402

IMG, VS, VE = 31000, 31001, 31002


def make_config(tiny: bool):
    text = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=8,
                num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=32768,
                rope_parameters=dict(rope_type="default", mrope_section=[16, 24, 24], rope_theta=1e6))
    vision = dict(depth=4, hidden_size=512, intermediate_size=1024, num_heads=8, out_hidden_size=2048, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[1, 3])
    if tiny:
        text.update(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, rope_parameters=dict(rope_type="default", mrope_section=[2, 3, 3]))
        vision.update(depth=2, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64)
    return transformers.Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=IMG,
                                         video_token_id=IMG + 3, vision_start_token_id=VS, vision_end_token_id=VE)


def make_samples(config, n, tiny, device, dtype, g):
    """Samples as the processor returns them for one sample each (batch dimension 1), on ``device``."""
    vc = config.vision_config
    patch_dim = 3 * vc.temporal_patch_size * vc.patch_size ** 2
    sides = [4, 6, 8] if tiny else list(range(16, 66, 2))  # patches per side; tokens = h * w / 4: 64..1024
    samples = []
    for _ in range(n):
        ids, types, pixels, grids = [], [], [], []
        for _ in range(int(torch.randint(0, 5, (1,), generator=g))):
            h, w = (sides[int(torch.randint(len(sides), (1,), generator=g))] for _ in range(2))
            tokens = h * w // vc.spatial_merge_size ** 2
            if not tiny and not 64 <= tokens <= 1024:
                continue
            ids += torch.randint(10, 30000, (8,), generator=g).tolist() + [VS] + [IMG] * tokens + [VE]
            types += [0] * 9 + [1] * tokens + [0]
            pixels.append(torch.randn(h * w, patch_dim, generator=g))
            grids.append([1, h, w])
        median = 30 if tiny else 300
        n_text = int(min(max(math.exp(torch.randn(1, generator=g).item() * 0.6 + math.log(median)), 8), 6 * median))
        ids += torch.randint(10, 30000 if not tiny else 90, (n_text,), generator=g).tolist()
        types += [0] * n_text
        ids = [i if i < config.text_config.vocab_size or i in (IMG, VS, VE) else i % 90 for i in ids]
        s = dict(input_ids=torch.tensor([ids]), mm_token_type_ids=torch.tensor([types]))
        s["labels"] = s["input_ids"].masked_fill(s["mm_token_type_ids"] == 1, -100)
        if pixels:
            s["pixel_values"] = torch.cat(pixels).to(dtype)
            s["image_grid_thw"] = torch.tensor(grids)
        samples.append({k: v.to(device) for k, v in s.items()})
    return samples


def padded_batch(samples, pad_id=0):
    """One right-padded row per sample with a 2D attention_mask; the model computes its own positions."""
    L = max(s["input_ids"].shape[1] for s in samples)
    out = {}
    for key, fill in (("input_ids", pad_id), ("labels", -100), ("mm_token_type_ids", 0)):
        out[key] = torch.stack([torch.nn.functional.pad(s[key][0], (0, L - s[key].shape[1]), value=fill)
                                for s in samples])
    out["attention_mask"] = torch.stack([torch.nn.functional.pad(torch.ones_like(s["input_ids"][0]),
                                                                 (0, L - s["input_ids"].shape[1])) for s in samples])
    with_images = [s for s in samples if "pixel_values" in s]
    if with_images:
        out["pixel_values"] = torch.cat([s["pixel_values"] for s in with_images])
        out["image_grid_thw"] = torch.cat([s["image_grid_thw"] for s in with_images])
    return dict(out, use_cache=False)


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed_steps(model, step, steps, device, keep=None):
    """``step()`` (a training step that returns a tensor) ``steps`` times; returns (first-call seconds, warm
    step seconds, peak bytes, the first step's tensor, through ``keep`` where given, on the host). Peak
    memory is over all steps. Shared with benchmarks/vlm_preference.py."""
    times, kept = [], None
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    for i in range(steps):
        model.zero_grad(set_to_none=True)
        sync(device)
        t = time.perf_counter()
        out = step()
        sync(device)
        times.append(time.perf_counter() - t)
        if i == 0:
            kept = (keep(out) if keep is not None else out).float().cpu()
        del out
    peak = torch.cuda.max_memory_allocated() if device.startswith("cuda") else float("nan")
    return times[0], statistics.median(times[1:]) if len(times) > 1 else times[0], peak, kept


def run_method(model, batch, steps, device, keep):
    """Forward + backward ``steps`` times (:func:`timed_steps`), keeping the first step's logits of the
    ``keep(logits)`` tokens."""
    def step():
        out = model(**batch)
        out.loss.backward()
        return out.logits.detach()

    return timed_steps(model, step, steps, device, keep)


def common_args(p, tokens_per: str, outputs: str) -> None:
    """The options benchmarks/vlm.py and benchmarks/vlm_preference.py share (``--out``: ``outputs``)."""
    p.add_argument("--tiny", action="store_true", help="tiny model and rows (CPU smoke test)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--row", type=int, default=None, help=f"tokens per {tokens_per} (default 8192; --tiny: 512)")
    p.add_argument("--rows", type=int, default=2)
    p.add_argument("--steps", type=int, default=6, help="timed steps per method, the first reported apart")
    p.add_argument("--out", default=None, help=f"folder for {outputs} (default: $OUT)")


def settings(args):
    """``(row, dtype, tol, config, generator)`` of the parsed :func:`common_args`."""
    row = args.row or (512 if args.tiny else 8192)
    dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    return row, dtype, tol, make_config(args.tiny), torch.Generator().manual_seed(0)


def per_sample(logits, spans):
    return torch.cat([logits[b, s:s + n] for b, s, n in spans])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common_args(p, "row", "vlm.json")
    args = p.parse_args(argv)
    row, dtype, tol, config, g = settings(args)
    pool = make_samples(config, 64, args.tiny, args.device, dtype, g)
    torch.manual_seed(0)
    model = transformers.Qwen2_5_VLForConditionalGeneration(config).to(args.device, dtype).train()
    packmask.enable(model)
    collator = MultimodalCollator(model, max_length=row)
    pool = [s for s in pool if s["input_ids"].shape[1] <= row]  # a sample is never split
    rows = collator.rows(pool)[:args.rows]
    samples = [s for r in rows for s in r]
    packed = collator.collate_rows(rows)
    spans = [(b, sum(x["input_ids"].shape[1] for x in r[:i]), s["input_ids"].shape[1])
             for b, r in enumerate(rows) for i, s in enumerate(r)]
    real = sum(n for _, _, n in spans)
    first_row = [span for span in spans if span[0] == 0]  # samples 0..k-1 of the padded batch, in order
    padded = padded_batch(samples)
    images = sum(len(s.get("image_grid_thw", [])) for s in samples)
    print(f"{len(samples)} samples, {images} images, {real} real tokens in {len(rows)} rows of {row}; padded batch "
          f"{tuple(padded['input_ids'].shape)} ({padded['input_ids'].numel()} slots)")
    methods = [("packmask", "packmask", packed, packed["input_ids"].numel()),
               ("packmask_vision_loop", "packmask", packed, packed["input_ids"].numel()),
               ("padded_sdpa", "sdpa", padded, padded["input_ids"].numel()),
               ("flatten_sdpa", "sdpa", packed, packed["input_ids"].numel())]
    results, logits, failures = {}, {}, []
    for name, impl, batch, slots in methods:
        model.set_attn_implementation(impl)
        varlen_vision(model, enable=name == "packmask")  # the vision tower in one varlen call per layer
        if batch is packed:  # the checked tokens: the first row's samples
            keep = lambda out: per_sample(out, first_row)  # noqa: E731
        else:
            keep = lambda out: torch.cat([out[i, :n] for i, (_, _, n) in enumerate(first_row)])  # noqa: E731
        try:
            first, warm, peak, logits[name] = run_method(model, batch, args.steps, args.device, keep)
        except torch.cuda.OutOfMemoryError as error:  # reported as a row, never hidden
            results[name] = dict(error=f"OOM: {str(error).splitlines()[0]}")
            failures.append(f"{name}: out of memory")
            continue
        results[name] = dict(first_call_s=first, warm_step_s=warm, real_tokens_per_s=real / warm,
                             peak_memory_gib=peak / 2 ** 30, slots=slots, real_tokens=real)
    varlen_vision(model, enable=False)
    model.set_attn_implementation("sdpa")  # control: the packed rows as one sequence each (no per-sample positions)
    with torch.no_grad():
        naive = model(**{k: v for k, v in packed.items() if k != "position_ids"}).logits.float()
    control = per_sample(naive, first_row).cpu()
    del naive
    ref = logits.get("padded_sdpa")
    if ref is not None:
        for name in ("packmask", "packmask_vision_loop", "flatten_sdpa"):
            if name in logits:
                err = ((logits[name] - ref).norm() / ref.norm()).item()
                results[name]["logits_rel_err_vs_alone"] = err
                if err > tol:
                    failures.append(f"{name}: logits differ from each sample alone by {err:.2e} > {tol:.0e}")
        control_err = ((control - ref).norm() / ref.norm()).item()
        results["control_one_sequence_rel_err"] = control_err
        if control_err <= tol:  # the exact methods must be within tol, the contaminated one beyond it
            failures.append(f"control: rows run as one sequence differ by only {control_err:.2e}: the check is blind")
    base = results.get("padded_sdpa", {}).get("real_tokens_per_s")
    flat = results.get("flatten_sdpa", {}).get("real_tokens_per_s")
    print(f"\n{'method':<22}{'tokens/s':>12}{'x padded':>10}{'x flatten':>11}{'warm s':>9}{'first s':>9}"
          f"{'peak GiB':>10}{'rel err':>10}")
    for name, _, _, _ in methods:
        r = results.get(name, {})
        if "error" in r:
            print(f"{name:<22}{r['error']}")
            continue
        tps = r["real_tokens_per_s"]
        print(f"{name:<22}{tps:>12.0f}{tps / base if base else float('nan'):>10.2f}"
              f"{tps / flat if flat else float('nan'):>11.2f}{r['warm_step_s']:>9.3f}{r['first_call_s']:>9.3f}"
              f"{r['peak_memory_gib']:>10.2f}{r.get('logits_rel_err_vs_alone', float('nan')):>10.1e}")
    print(f"control (rows as one sequence) rel err {results.get('control_one_sequence_rel_err', float('nan')):.1e}")
    env = dict(script="benchmarks/vlm.py", device=torch.cuda.get_device_name() if args.device.startswith("cuda") else
               "cpu", torch=torch.__version__, transformers=transformers.__version__, packmask=packmask.__version__,
               dtype=str(dtype).replace("torch.", ""), date=datetime.date.today().isoformat(), tiny=args.tiny,
               rows=len(rows), row=row, samples=len(samples), images=images, steps=args.steps)
    finish("vlm", dict(env=env, results=results, failures=failures), failures, out=args.out)


if __name__ == "__main__":
    main()
