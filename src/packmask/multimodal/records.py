"""One image-text record through the model's processor: images resolved and checked, the text (or the
conversation, through the processor's chat template) tokenized with its image tokens, labels made.

A record is ``{"text": "...", "images": [...]}`` or ``{"messages": [...], "images": [...]}``; the
text holds one image placeholder (``processor.image_token``: ``<|image_pad|>`` for Qwen,
``<start_of_image>`` for Gemma 3, ``<image>`` for LLaVA; a chat template writes it for each
``{"type": "image"}`` content part) per image, in order. An image is

* a path (``str``), relative to ``base_dir`` (the input file's folder), or a ``data:`` URI with base64;
* ``bytes``;
* ``{"bytes": ..., "path": ...}`` as the Hugging Face ``datasets`` ``Image`` feature stores it
  (``bytes`` raw or base64 text, else ``path`` is read), or a decoded ``PIL.Image`` (stored as PNG).

Every problem is a :class:`RecordProblem` naming the field (``images[1]``, ``text``) and the fix;
the caller adds the file and line. The image tokens of a sample are counted by the processor itself
(never guessed), so a row's length is exact::

    record    {"text": "w5 <|vision_start|><|image_pad|><|vision_end|> w7", "images": ["a.png"]}
    a.png     24 x 32 pixels -> processor: 6 x 8 patches, merged 2 x 2 -> 12 image tokens
    tokens    w5 <vs> I x12 <ve> w7              (15 tokens, counted for packing)
    labels    w5 <vs> -100 x12 <ve> w7           (image tokens never scored)

>>> image_bytes({"bytes": b"\\x89PNG..."}, "images[0]", ".")
b'\\x89PNG...'
>>> image_bytes(3, "images[0]", ".")
Traceback (most recent call last):
packmask.multimodal.records.RecordProblem: field 'images[0]' is an int (3), not an image (fix: give a path, bytes, or {"bytes": ...} like datasets' Image feature)
"""
from __future__ import annotations

import base64
import binascii
import inspect
import io
import re
from pathlib import Path

from ..errors import PackmaskError

__all__ = ["RecordProblem", "image_bytes", "open_image", "record_images", "process_record", "processor_call",
           "check_processor", "takes_suffix", "IMAGE_FIX", "TRAIN_ON"]

IMAGE_FIX = 'give a path, bytes, or {"bytes": ...} like datasets\' Image feature'
TRAIN_ON = ("assistant", "all")
_TYPE_KEYS = ("mm_token_type_ids", "token_type_ids")


class RecordProblem(PackmaskError):
    """What is wrong with one record: ``field`` (``images[1]``), ``problem`` (a sentence naming the
    field) and ``fix``; ``str()`` is ``<problem> (fix: <fix>)``."""

    def __init__(self, field: str, problem: str, fix: str):
        super().__init__(f"{problem} (fix: {fix})")
        self.field, self.problem, self.fix = field, problem, fix


def check_processor(processor) -> None:
    """Refuse a processor these records cannot drive: none with an image processor."""
    if getattr(processor, "image_processor", None) is None or not callable(processor):
        raise PackmaskError(f"{type(processor).__name__} is not a vision-language processor (no image_processor): "
                            f"give the model's AutoProcessor, or pack text with a tokenizer instead.")


def _call_takes(processor, name: str) -> bool:
    """Whether ``processor(...)`` takes keyword ``name`` (named, or through ``**kwargs``): by feature, not version."""
    try:
        params = inspect.signature(processor.__call__).parameters
    except (TypeError, ValueError):  # no signature to read: assume the common form, ``**kwargs``
        return True
    return name in params or any(p.kind == p.VAR_KEYWORD for p in params.values())


def takes_suffix(processor) -> bool:
    """Whether ``processor`` trains on a prompt and its answer given apart (``suffix=``, PaliGemma): a
    sample is a prefix (images + prompt, which see each other) and a suffix (scored, causal), told apart
    by its ``token_type_ids`` (0 prefix, 1 suffix). Read by feature: a named parameter of the call, or
    a key of the text options its ``**kwargs`` declare (``valid_processor_kwargs``, as older versions do).

    >>> from packmask.multimodal.tiny_processor import tiny_processor
    >>> takes_suffix(tiny_processor("paligemma")), takes_suffix(tiny_processor("gemma3"))
    (True, False)
    """
    try:
        if "suffix" in inspect.signature(processor.__call__).parameters:
            return True
    except (TypeError, ValueError):
        pass
    options = getattr(getattr(processor, "valid_processor_kwargs", None), "__annotations__", {})
    return "suffix" in getattr(options.get("text_kwargs"), "__annotations__", {})


def _kind(value) -> str:
    kind = type(value).__name__
    article = "an" if kind[0] in "aeiou" else "a"
    return f"{article} {kind}" if isinstance(value, (list, dict)) else f"{article} {kind} ({repr(value)[:40]})"


def _read(path_text: str, field: str, base_dir) -> bytes:
    path = Path(path_text).expanduser()
    full = (path if path.is_absolute() else Path(base_dir) / path).absolute()
    try:
        return full.read_bytes()
    except FileNotFoundError:
        raise RecordProblem(field, f"field {field!r}: no such image file {path_text!r} (looked for {full})",
                            "fix the path (relative paths are read from the input file's folder, or "
                            "--image-root DIR)") from None
    except (IsADirectoryError, PermissionError, OSError) as error:
        raise RecordProblem(field, f"field {field!r}: cannot read {full} ({error.strerror or error})",
                            "point the path at a readable image file") from None


def image_bytes(value, field: str, base_dir) -> bytes:
    """The encoded bytes of one image value (see the module docstring), or a :class:`RecordProblem`."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if hasattr(value, "save") and hasattr(value, "mode"):  # a PIL image (datasets' Image feature, decoded)
        buffer = io.BytesIO()
        value.save(buffer, format="PNG")  # lossless: the processor sees the same pixels
        return buffer.getvalue()
    if isinstance(value, str):
        if value.startswith("data:"):
            head, _, data = value.partition(",")
            if ";base64" not in head:
                raise RecordProblem(field, f"field {field!r} is a data URI without ';base64'", IMAGE_FIX)
            return _base64(data, field)
        return _read(value, field, base_dir)
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
        if isinstance(data, str):  # JSON has no bytes: base64 text
            return _base64(data, f"{field}.bytes")
        if data is not None:
            return image_bytes(data, f"{field}.bytes", base_dir)
        if isinstance(path, str):
            return _read(path, f"{field}.path", base_dir)
        raise RecordProblem(field, f"field {field!r} has neither 'bytes' nor 'path'", IMAGE_FIX)
    if value is None:
        raise RecordProblem(field, f"field {field!r} is null", "remove the null, or give the image")
    raise RecordProblem(field, f"field {field!r} is {_kind(value)}, not an image", IMAGE_FIX)


def _base64(text: str, field: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise RecordProblem(field, f"field {field!r} is text but not base64 image bytes",
                            "give raw bytes (Parquet binary), base64 of the file, or a path") from None


def open_image(data: bytes, field: str, path: str | None = None):
    """A decoded ``PIL.Image`` (pixels loaded, so a truncated file fails here, not in the processor); a
    failure names the image by ``path`` where it came from a file, else by its size, never by an object:

    >>> open_image(b"hello", "images[1]")
    Traceback (most recent call last):
    packmask.multimodal.records.RecordProblem: field 'images[1]' (5 bytes given) is not an image PIL can read (cannot identify image file) (fix: re-save the image as PNG or JPEG, or remove it from the record)
    """
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        first = _OBJECT_REPR.sub("", first).strip() or type(error).__name__  # PIL names the buffer: <_io.BytesIO ...>
        what = f"file {path!r}" if path is not None else f"{len(data):,} bytes given"
        raise RecordProblem(field, f"field {field!r} ({what}) is not an image PIL can read ({first})",
                            "re-save the image as PNG or JPEG, or remove it from the record") from None
    return image


_OBJECT_REPR = re.compile(r"\s*<[^<>]* object at 0x[0-9a-fA-F]+>")


def _image_path(value) -> str | None:
    """The file an image value is read from (``"a.png"``, ``{"path": "a.png"}``), or None for bytes."""
    if isinstance(value, str) and not value.startswith("data:"):
        return value
    if isinstance(value, dict) and value.get("bytes") is None and isinstance(value.get("path"), str):
        return value["path"]
    return None


def record_images(value, name: str, base_dir) -> list[bytes]:
    """The encoded bytes of a record's images (``None``: no images), each checked to decode."""
    if value is None:
        return []
    if not isinstance(value, (list, tuple)):
        raise RecordProblem(name, f"field {name!r} is {_kind(value)}, not a list of images",
                            f'write "{name}": [...] (a list, even for one image)')
    found = []
    for i, item in enumerate(value):
        data = image_bytes(item, f"{name}[{i}]", base_dir)
        open_image(data, f"{name}[{i}]", _image_path(item))
        found.append(data)
    return found


def processor_call(processor, text: str, images: list, field: str, suffix: str | None = None) -> dict:
    """``processor(text=[text], images=...)`` for ONE sample as tensors (``suffix=[suffix]`` where
    given), with its token-type ids where the processor takes ``return_mm_token_type_ids`` (the Qwen
    families' positions need them); a refusal is a :class:`RecordProblem`."""
    kwargs = dict(text=[text], images=images or None, return_tensors="pt")
    if suffix is not None:
        kwargs["suffix"] = [suffix]
    option = dict(return_mm_token_type_ids=True) if _call_takes(processor, "return_mm_token_type_ids") else {}
    try:  # a strict signature predating the option: without it; **kwargs that refuse it: again without it
        try:
            out = processor(**kwargs, **option)
        except TypeError as error:
            if not option or "return_mm_token_type_ids" not in str(error):
                raise
            out = processor(**kwargs)
    except (ValueError, TypeError, KeyError, IndexError, OSError) as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise RecordProblem(field, f"the processor rejected field {field!r} with its images ({first})",
                            "fix the record so the processor takes it") from None
    return dict(out)


def _render(processor, messages, field: str, generation_prompt: bool) -> str:
    try:
        return processor.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as error:  # noqa: BLE001 -- the template's own raise_exception / jinja errors, reported
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise RecordProblem(field, f"the chat template rejected field {field!r} ({type(error).__name__}: {first})",
                            "fix the conversation, or use a processor whose template takes it") from None


def _count_placeholders(processor, text: str, n_images: int, field: str, images_name: str) -> None:
    token = getattr(processor, "image_token", None)
    found = text.count(token) if token else n_images
    if found != n_images:
        chat = field != "text"
        raise RecordProblem(images_name, f"field {images_name!r} holds {n_images} image{'s' * (n_images != 1)} but "
                                         f"field {field!r} has {found} image placeholder{'s' * (found != 1)} {token!r}",
                            ('give one {"type": "image"} content part per image, in order' if chat else
                             f"write one {token} in the text per image, in order") + ", or make the image list match")


def _image_token_mask(processor, out: dict, type_keys=_TYPE_KEYS):
    """Tokens of images (and videos): type ids != 0 where the processor returns them, and the
    processor's ``image_token_id``."""
    import torch

    ids = out["input_ids"][0]
    mask = torch.zeros_like(ids, dtype=torch.bool)
    for key in type_keys:
        if key in out:
            mask |= out[key][0] != 0
    token_id = getattr(processor, "image_token_id", None)
    if isinstance(token_id, int):
        mask |= ids == token_id
    return mask


def _assistant_mask(processor, messages, images, ids, field: str, full_text: str):
    """Assistant turns by prefix rendering, as :mod:`packmask.data.chat` does for text: the tokens after
    ``messages[:k]`` with the generation prompt, up to ``messages[:k + 1]`` (images counted in each;
    each prefix runs through the processor, except the whole conversation, already run)."""
    import torch

    mask = torch.zeros(len(ids), dtype=torch.bool)
    for k, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        bounds = []
        for prefix, prompt in ((messages[:k], True), (messages[:k + 1], False)):
            if not prefix:
                bounds.append(0)
                continue
            text = _render(processor, prefix, field, prompt)
            if text == full_text:
                bounds.append(len(ids))
                continue
            n = text.count(processor.image_token) if getattr(processor, "image_token", None) else 0
            part = processor_call(processor, text, images[:n], field)["input_ids"][0].tolist()
            if ids[:len(part)] != part:
                raise RecordProblem(field, f"the chat template renders field {field!r} differently once later turns "
                                           f"are added (assistant message {k}), so its tokens cannot be located",
                                    "add {% generation %} markers, or pass --train-on all")
            bounds.append(len(part))
        mask[bounds[0]:bounds[1]] = True
    return mask


def _without_null_keys(messages):
    """Content parts without null keys: Arrow gives every part of a column every key any part has
    (``{"type": "text", "text": "hi", "image": None}``), and templates test ``'image' in part``."""
    if not isinstance(messages, list):
        return messages
    return [dict(m, content=[{k: v for k, v in p.items() if v is not None} if isinstance(p, dict) else p
                             for p in m["content"]]) if isinstance(m, dict) and isinstance(m.get("content"), list)
            else m for m in messages]


def _suffix_of(record: dict, kind: str, field: str, suffix_field: str, processor) -> str:
    name = type(processor).__name__
    if kind == "chat":
        raise RecordProblem(field, f"field {field!r} is a conversation, but {name} trains on a prompt and its answer "
                                   f"apart", f'give {{"text": prompt, "{suffix_field}": answer, "images": [...]}}')
    suffix = record.get(suffix_field)
    if not isinstance(suffix, str):
        what = "missing" if suffix is None else f"{_kind(suffix)}, not text"
        raise RecordProblem(suffix_field, f"field {suffix_field!r} is {what}: {name} scores the answer given as "
                                          f"{suffix_field!r}, after the prompt in 'text'",
                            f'give every record "{suffix_field}": the answer to train on')
    return suffix


def process_record(record: dict, processor, *, field: str, kind: str, images_field: str = "images",
                   base_dir=".", train_on: str = "assistant", suffix_field: str = "suffix") -> dict:
    """One record as a stored sample: ``input_ids``, ``labels``, the type ids (``mm_token_type_ids`` or
    ``token_type_ids``, as the processor names them), ``images`` (encoded bytes, in order) and ``text``
    (what the processor was given, to run it again when training).

    ``kind``: ``"text"`` (``record[field]`` is text, every text token scored) or ``"chat"``
    (``record[field]`` is messages; ``train_on="assistant"`` scores the assistant turns only).

    A processor that takes ``suffix=`` (PaliGemma, :func:`takes_suffix`) gets ``record[field]`` as the
    prompt and ``record[suffix_field]`` as the answer: labels on the answer only (``token_type_ids``
    1), the sample keeps its ``suffix``; images without placeholders go first, PaliGemma's layout::

        {"text": "w5 w6", "suffix": "w7 w8", "images": ["a.png"]}
        input_ids       <image> x16  <s> w5 w6 | w7 w8 </s>
        token_type_ids  0 x16        0   0  0  | 1  1  1       (prefix: bidirectional; suffix: causal)
        labels          -100 x16  -100 -100 -100 | w7 w8 </s>
    """
    images = record_images(record.get(images_field), images_field, base_dir)
    value = record.get(field)
    suffix = _suffix_of(record, kind, field, suffix_field, processor) if takes_suffix(processor) else None
    if kind == "chat":
        if not getattr(processor, "chat_template", None):  # every record would fail: one error, never skipped
            raise PackmaskError(f"{type(processor).__name__} has no chat template, so conversations ({field!r}) cannot "
                                f"be rendered: use a chat/instruct model's processor, or give records with text.")
        value = _without_null_keys(value)
        text = _render(processor, value, field, False)
    elif isinstance(value, str):
        text = value
    else:
        raise RecordProblem(field, f"field {field!r} is {_kind(value) if value is not None else 'null'}, not text",
                            "give every record its text")
    token = getattr(processor, "image_token", None)
    if suffix is not None and images and token and token not in text:
        text = token * len(images) + text  # what PaliGemma's processor does itself (with a warning per call)
    _count_placeholders(processor, text, len(images), field, images_field)
    pil = [open_image(data, f"{images_field}[{i}]") for i, data in enumerate(images)]
    out = processor_call(processor, text, pil, field, suffix)
    ids = out["input_ids"][0].tolist()
    labels = out["input_ids"][0].clone()
    type_keys = _TYPE_KEYS if suffix is None else ("mm_token_type_ids",)  # PaliGemma's token_type_ids: the suffix
    if suffix is not None:
        if "token_type_ids" not in out:
            raise PackmaskError(f"{type(processor).__name__} returned no token_type_ids with suffix=, so the answer "
                                f"cannot be told from the prompt: use a processor that returns them.")
        labels[out["token_type_ids"][0] == 0] = -100
    elif kind == "chat" and train_on == "assistant":
        labels[~_assistant_mask(processor, value, pil, ids, field, text)] = -100
    labels[_image_token_mask(processor, out, type_keys)] = -100
    sample = {"input_ids": ids, "labels": labels.tolist(), "images": images, "text": text}
    if suffix is not None:
        sample["suffix"] = suffix
    for key in type_keys:
        if key in out:
            sample["token_types"] = out[key][0].tolist()
            sample["token_type_key"] = key
    return sample
