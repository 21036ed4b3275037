"""GPU correctness check: packmask's CUDA backends (varlen, flex) against the reference.

For tiny-but-not-trivial models in bf16 on CUDA, every backend's packed logits and parameter
gradients are compared with the same weights in fp32 run on each sequence alone (the ground
truth). The bf16 noise floor is shown beside: the bf16 model run on each sequence alone with
transformers' sdpa. A backend passes when its error is within 2x the noise floor (+1e-3).

Forms: collator keys (block-diagonal → varlen by default), a [B, N, N] prefix-LM mask (general →
flex) and a shared-prefix tree. Writes $OUT/gpu_check.json.
"""
import json
import os
import time

import torch
import transformers

import packmask
from packmask.testing import grad_rel_err, pack_rows, rel_err, run_alone, tiny_model

DEV = "cuda"
SIZES = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=3, num_attention_heads=8,
             num_key_value_heads=2, max_position_embeddings=4096, vocab_size=512)
FAMILY_SIZES = {"mistral": dict(sliding_window=64), "gemma2": dict(sliding_window=64, head_dim=32,
                                                                   query_pre_attn_scalar=32),
                "qwen3": dict(head_dim=32)}
SEQ = [[300, 120, 500, 104], [1000, 24]]
N = 1024


def main():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 512, (2, N), generator=g).to(DEV)
    slices, pos = pack_rows(SEQ, N)
    pos = pos.to(DEV)
    weights = torch.zeros(2, N, 512)
    for b, s, length in slices:
        weights[b, s:s + length] = torch.randn(length, 512, generator=g)
    weights = weights.to(DEV)
    layout = packmask.DocumentLayout.from_seq_lengths(SEQ, N, device=DEV)
    collator = dict(position_ids=pos, cu_seq_lens_q=layout.cu_seqlens, cu_seq_lens_k=layout.cu_seqlens,
                    max_length_q=layout.max_seqlen, max_length_k=layout.max_seqlen)
    results = []
    for family in os.environ.get("FAMILIES", "llama,mistral,gemma2,qwen3").split(","):
        kw = dict(SIZES, **FAMILY_SIZES.get(family, {}))
        ref32 = tiny_model(family, "eager", **kw).to(DEV)
        expected = run_alone(ref32, ids, slices)
        (expected * weights).sum().backward()
        noise = tiny_model(family, "sdpa", dtype=torch.bfloat16, **kw).to(DEV)
        noise.load_state_dict(ref32.state_dict())
        n_out = run_alone(noise, ids, slices).float()
        (n_out * weights).sum().backward()
        floor = rel_err(n_out, expected)
        gfloor, _ = grad_rel_err(noise, ref32)
        for backend in ["auto", "varlen", "flex", "sdpa", "eager"]:
            model = tiny_model(family, "packmask", dtype=torch.bfloat16, **kw).to(DEV)
            model.load_state_dict(ref32.state_dict())
            packmask.set_backend(backend)
            row = dict(family=family, form="collator", backend=backend, noise_logits=floor, noise_grads=gfloor)
            try:
                t = time.perf_counter()
                out = model(input_ids=ids, **collator).logits.float() * (weights.abs().sum(-1, keepdim=True) > 0)
                (out * weights).sum().backward()
                torch.cuda.synchronize()
                row.update(seconds=time.perf_counter() - t, logits=rel_err(out, expected))
                row["grads"], row["worst_param"] = grad_rel_err(model, ref32)
                row["passed"] = row["logits"] <= 2 * floor + 1e-3 and row["grads"] <= 2 * gfloor + 1e-3
            except packmask.PackmaskError as e:
                row.update(refused=str(e)[:200], passed=None)
            except Exception as e:  # noqa: BLE001 — record and go on: one broken kernel must not hide the rest
                row.update(error=repr(e)[:300], passed=False)
            finally:
                packmask.set_backend("auto")
            results.append(row)
            print(row, flush=True)
    # general masks (prefix-LM, tree) through flex vs dense eager fp32 with the same mask
    for name, mask in [("prefix_lm", packmask.prefix_lm_mask(SEQ, [[100, 0, 200, 10], [500, 0]], N)),
                       ("tree", torch.stack([packmask.shared_prefix_tree_mask(200, [300, 400, 124])] * 2))]:
        mask = mask.to(DEV)
        p = packmask.position_ids_from_mask(mask)
        ref32 = tiny_model("llama", "eager", **SIZES).to(DEV)
        add = torch.where(mask, 0.0, torch.finfo(torch.float32).min)[:, None]
        exp = ref32(input_ids=ids, attention_mask=add, position_ids=p, use_cache=False).logits
        for backend in ["auto", "flex", "sdpa"]:
            model = tiny_model("llama", "packmask", dtype=torch.bfloat16, **SIZES).to(DEV)
            model.load_state_dict(ref32.state_dict())
            packmask.set_backend(backend)
            row = dict(family="llama", form=name, backend=backend)
            try:
                out = model(input_ids=ids, attention_mask=mask).logits.float()
                row["logits"] = rel_err(out, exp)
                row["passed"] = row["logits"] < 2e-2
            except Exception as e:  # noqa: BLE001
                row.update(error=repr(e)[:300], passed=False)
            packmask.set_backend("auto")
            results.append(row)
            print(row, flush=True)
    env = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, transformers=transformers.__version__,
               date=time.strftime("%Y-%m-%d"))
    print(env)
    bad = [r for r in results if r.get("passed") is False]
    print(f"{len(results) - len(bad)} passed, {len(bad)} failed")
    out = os.environ.get("OUT")
    if out:
        json.dump(dict(env=env, results=results), open(os.path.join(out, "gpu_check.json"), "w"), indent=1)


if __name__ == "__main__":
    main()
