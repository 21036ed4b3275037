"""``cache=`` reaches a packmask model on every supported transformers release: 5.2x names the
forward's argument ``cache``; the 5.17 floor names it ``past_key_values`` and would let ``cache=``
flow on through ``**kwargs`` unread (the model then runs without the cached tokens). The floor leg of
.ci/run runs this against 5.17."""
import torch

from packmask.kvcache import cache_keyword, output_cache
from packmask.testing import rel_err, tiny_model


def test_cache_keyword_reaches_the_model_on_this_release():
    model = tiny_model("llama")
    ids = torch.randint(3, 100, (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(input_ids=ids, use_cache=False).logits[0, -1]
        first = model(input_ids=ids[:, :5], use_cache=True)
        step = model(input_ids=ids[:, 5:], cache=output_cache(first), use_cache=True).logits[0, -1]
        alone = model(input_ids=ids[:, 5:], use_cache=True).logits[0, -1]  # control: the cache not used
    assert rel_err(step, full) <= 1e-5
    assert rel_err(alone, full) > 1e-2
    assert cache_keyword(["input_ids", "kwargs"]) is None
