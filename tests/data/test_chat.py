"""Chat data: assistant-only labels through the tokenizer's chat template, with and without generation
markers, and clear errors. The tokenizer is built offline (a word-level vocabulary, no download)."""
import pytest
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

import packmask
from packmask import PackmaskError
from packmask.data.chat import tokenize_chat_dataset, tokenize_messages

SPECIAL = ["[UNK]", "<|im_start|>", "<|im_end|>"]
TURN = "<|im_start|>{{ m['role'] }}\n"
# ChatML-style; the assistant's reply and its end-of-turn token are what the model should learn
TEMPLATE_MARKED = ("{% for m in messages %}" + TURN + "{% if m['role'] == 'assistant' %}{% generation %}"
                   "{{ m['content'] }}<|im_end|>{% endgeneration %}{% else %}{{ m['content'] }}<|im_end|>{% endif %}\n"
                   "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TEMPLATE_PLAIN = TEMPLATE_MARKED.replace("{% generation %}", "").replace("{% endgeneration %}", "")
# drops earlier assistant replies once the conversation goes on (like templates that strip old reasoning)
TEMPLATE_REWRITES = TEMPLATE_PLAIN.replace("{{ m['content'] }}<|im_end|>{% else %}",
                                           "{% if loop.last %}{{ m['content'] }}{% endif %}<|im_end|>{% else %}")

CHAT = [{"role": "system", "content": "be kind"}, {"role": "user", "content": "hi there"},
        {"role": "assistant", "content": "hello you"}, {"role": "user", "content": "how are you"},
        {"role": "assistant", "content": "fine thanks"}]


@pytest.fixture(scope="module")
def vocab_tokenizer():
    words = "system user assistant be kind hi there hello you how are fine thanks ok".split()
    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator([" ".join(words)], trainers.WordLevelTrainer(special_tokens=SPECIAL))
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]",
                                   additional_special_tokens=SPECIAL[1:])


def _with(tokenizer, template):
    tokenizer.chat_template = template
    return tokenizer


def _labelled_words(tokenizer, out):
    return [tokenizer.convert_ids_to_tokens(t) for t in out["labels"] if t != -100]


@pytest.mark.parametrize("template", [TEMPLATE_MARKED, TEMPLATE_PLAIN], ids=["generation-markers", "prefix-diff"])
def test_labels_only_on_assistant_turns(vocab_tokenizer, template):
    out = tokenize_messages(_with(vocab_tokenizer, template), CHAT)
    tokens = vocab_tokenizer.convert_ids_to_tokens(out["input_ids"])
    assert tokens[:4] == ["<|im_start|>", "system", "be", "kind"] and len(out["labels"]) == len(tokens)
    assert _labelled_words(vocab_tokenizer, out) == ["hello", "you", "<|im_end|>", "fine", "thanks", "<|im_end|>"]
    # every labelled token is the input token at that place (labels are not shifted)
    assert all(label in (-100, token) for label, token in zip(out["labels"], out["input_ids"]))


def test_both_methods_agree_and_train_on_all(vocab_tokenizer):
    marked = tokenize_messages(_with(vocab_tokenizer, TEMPLATE_MARKED), CHAT)
    plain = tokenize_messages(_with(vocab_tokenizer, TEMPLATE_PLAIN), CHAT)
    assert marked == plain
    everything = tokenize_messages(vocab_tokenizer, CHAT, train_on="all")
    assert everything["labels"] == everything["input_ids"] == plain["input_ids"]


def test_template_that_rewrites_earlier_turns_is_refused(vocab_tokenizer):
    with pytest.raises(PackmaskError, match="generation"):
        tokenize_messages(_with(vocab_tokenizer, TEMPLATE_REWRITES), CHAT)


@pytest.mark.parametrize("messages, match", [
    ([], "empty list of messages"),
    ([{"content": "hi"}], r"'messages\[0\].role' is missing"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant"}], r"'messages\[1\].content' is missing"),
    ("hi there", "not a list of messages"),
])
def test_malformed_messages_are_named(vocab_tokenizer, messages, match):
    with pytest.raises(PackmaskError, match=match):
        tokenize_messages(_with(vocab_tokenizer, TEMPLATE_PLAIN), messages)


def test_no_template_or_bad_train_on(vocab_tokenizer):
    with pytest.raises(PackmaskError, match="no chat template"):
        tokenize_messages(_with(vocab_tokenizer, None), CHAT)
    with pytest.raises(PackmaskError, match="train_on"):
        tokenize_messages(_with(vocab_tokenizer, TEMPLATE_PLAIN), CHAT, train_on="assistants")


def test_chat_dataset_tokenizes_and_packs(vocab_tokenizer):
    short = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]
    ds = Dataset.from_dict({"messages": [CHAT, short, short], "id": [0, 1, 2]})
    tokenized = tokenize_chat_dataset(ds, _with(vocab_tokenizer, TEMPLATE_MARKED))
    assert sorted(tokenized.column_names) == ["id", "input_ids", "labels"]
    packed = packmask.pack_dataset(tokenized, 64, strategy="sequential")
    assert packed.num_rows == 1 and packed[0]["seq_lengths"] == [len(r) for r in tokenized["input_ids"]]
    words = _labelled_words(vocab_tokenizer, packed[0])
    assert words == ["hello", "you", "<|im_end|>", "fine", "thanks", "<|im_end|>"] + ["ok", "<|im_end|>"] * 2
    bad = Dataset.from_dict({"messages": [short, [{"role": "user"}]]})
    with pytest.raises(PackmaskError, match=r"row 1 \(dataset\[1\]\): field 'messages\[0\].content'"):
        tokenize_chat_dataset(bad, vocab_tokenizer)
    with pytest.raises(PackmaskError, match="column 'conversation' not found"):
        tokenize_chat_dataset(ds, vocab_tokenizer, column="conversation")
