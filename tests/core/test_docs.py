"""The docs' recipes run as printed.

Convention: a fenced ```python block directly preceded by a line ``<!-- test -->`` in a page under
docs/ is executed here (a block of ``>>>`` lines runs as a doctest). A block may use the names a
reader brings along (``name``, ``tok``, ``tokenized``, ``chats``, ...): they are built below from a
tiny random Llama and the demo's offline tokenizer, saved to a temporary folder, so nothing is
downloaded. Mark only blocks that run on a CPU in about a second. The README quickstart is run (and
its printed error checked) by tests/core/test_readme.py.
"""
import doctest
import pathlib
import re

import pytest
import torch

DOCS = next(p for p in pathlib.Path(__file__).resolve().parents if (p / "pyproject.toml").is_file()) / "docs"
MARKER = "<!-- test -->"
# pages whose recipes must stay under test: removing a marker fails test_marked_blocks_exist
EXPECTED = {"packing.md": 4, "preference.md": 2, "speculative-decoding.md": 2, "multimodal.md": 3}  # multimodal: its page

CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{% if m['role'] == 'assistant' %}{% generation %}"
                 "{{ m['content'] }}<|endoftext|>{% endgeneration %}{% else %}{{ m['content'] }}{% endif %}"
                 "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")


def marked_blocks():
    """(page, line, code) of every marked python block, in page order."""
    found = []
    for page in sorted(DOCS.glob("*.md")):
        text = page.read_text()
        for m in re.finditer(re.escape(MARKER) + r"\n```python\n(.*?)```", text, re.S):
            found.append((page.name, text[:m.start()].count("\n") + 2, m.group(1)))
    return found


BLOCKS = marked_blocks()


def test_marked_blocks_exist():
    counts = {page: sum(1 for p, _, _ in BLOCKS if p == page) for page in EXPECTED}
    assert counts == EXPECTED


@pytest.fixture(scope="module")
def reader(tmp_path_factory):
    """What a reader of the docs has at hand: a model folder, its tokenizer and some data."""
    import datasets
    from transformers import AutoModelForCausalLM

    import packmask
    from packmask.cli.demo import build_demo_tokenizer
    from packmask.testing import tiny_model

    folder = tmp_path_factory.mktemp("model")
    tok = build_demo_tokenizer(vocab_size=400)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(folder)
    tiny_model("llama", vocab_size=len(tok)).save_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="packmask").eval()

    g = torch.Generator().manual_seed(0)
    docs = [torch.randint(3, 300, (n,), generator=g).tolist() for n in (50, 300, 700, 120, 900, 40)]
    tokenized = datasets.Dataset.from_dict({"input_ids": docs})
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]
    prompt = torch.randint(3, 300, (1, 6), generator=g)
    return dict(
        name=str(folder), tok=tok, tokenizer=tok, model=model, tokenized=tokenized,
        stream=[{"input_ids": d} for d in docs],
        chats=datasets.Dataset.from_dict({"messages": [chat] * 3}),
        batch=packmask.PackedCollator()(list(packmask.pack_dataset(tokenized, 1024))),
        ds=datasets.Dataset.from_dict({"prompt_ids": [[5, 6, 7], [8, 9]], "chosen_ids": [[10, 11], [12]],
                                       "rejected_ids": [[13, 14], [15]]}),
        text_ds=datasets.Dataset.from_dict({"prompt": ["Return the sum", "Open a file"],
                                            "chosen": [" of a and b.", " for reading."],
                                            "rejected": [" of nothing.", " and close it."]}),
        prompts=[[5, 6, 7], [8, 9]], completions=[[[10, 11], [12]], [[13], [14, 15], [16]]],
        prompt=prompt, **_draft(model, prompt),
    )


def _draft(model, prompt):
    """A draft for the tree a b | c d e | f g whose path a → c → f is the target's own greedy text,
    and whose other tokens are all wrong: the recipe must accept exactly [0, 2, 5]."""
    ids = prompt
    with torch.no_grad():
        for _ in range(4):
            ids = torch.cat([ids, model(input_ids=ids).logits[:, -1:].argmax(-1)], 1)
    g1, g2, g3, g4 = ids[0, -4:].tolist()
    vocab = model.config.vocab_size
    draft = [g1, (g1 + 1) % vocab, g2, (g2 + 1) % vocab, 7, g3, 9]
    return dict(draft_ids=draft, greedy_bonus=g4)


def _check_spec_decoding(ns):
    assert ns["path"] == [0, 2, 5], ns["path"]
    assert int(ns["bonus"]) == ns["greedy_bonus"]
    assert ns["cache"].get_seq_length() == ns["past"] + len(ns["path"]) + 1


def _check_loss(ns):
    assert torch.isfinite(ns["loss"]) and ns["loss"] > 0


CHECKS = {("speculative-decoding.md", 1): _check_spec_decoding, ("packing.md", 3): _check_loss}


@pytest.mark.parametrize("page,line,code", BLOCKS, ids=[f"{p}:{n}" for p, n, _ in BLOCKS])
def test_doc_block_runs(reader, page, line, code):
    import packmask

    ns = {"__name__": f"docs_{page}", **reader}
    if code.lstrip().startswith(">>>"):
        test = doctest.DocTestParser().get_doctest(code, {"packmask": packmask, "torch": torch}, page, page, line)
        result = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE).run(test)
        assert result.failed == 0, f"{page}:{line}: doctest failed"
    else:
        exec(compile(code, f"{page}:{line}", "exec"), ns)
    index = [n for p, n, _ in BLOCKS if p == page].index(line)
    if (page, index) in CHECKS:
        CHECKS[page, index](ns)
