"""The non-text parts of a prompt, counted for the hold.

A request's size says what its text costs (about four characters a token) but nothing of what
an upstream bills for an image, an audio clip or a PDF: a short URL can be billed as thousands of
tokens. So the hold counts each such part at an allowance per part (per model, see
``proxy.selectors.allowance_for``) — images by the detail they declare — and prices the prompt at
the larger of that and the plain byte count, so it is never below what the size alone gives.

The parts are found by their ``type`` wherever they sit in the body, in each protocol's spelling:
chat completions (``image_url``, ``input_audio``, ``file``), Responses (``input_image``,
``input_audio``, ``input_file``) and Messages (``image``, ``document``).
"""

from __future__ import annotations

from dataclasses import dataclass

from .usage import estimate_tokens

IMAGE_TYPES = frozenset({"image_url", "input_image", "image"})
AUDIO_TYPES = frozenset({"input_audio"})
FILE_TYPES = frozenset({"file", "input_file", "document"})
MAX_DEPTH = 64  # a body nested deeper is still walked no further (it was parsed within limits)


@dataclass(frozen=True)
class Media:
    """How many non-text parts a prompt has, and the characters of the body they take."""

    images: int = 0  # detail high, auto or not given: counted as the dearer kind
    images_low: int = 0
    audio: int = 0
    files: int = 0
    chars: int = 0

    def __bool__(self) -> bool:
        return bool(self.images or self.images_low or self.audio or self.files)


@dataclass(frozen=True)
class Allowance:
    """Prompt tokens the hold assumes per part of each kind."""

    image: int
    image_low: int
    audio: int
    file: int


def _chars(value: object) -> int:
    """Characters of the strings inside ``value`` (what the part adds to the body's size)."""
    total, stack = 0, [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            total += len(item)
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return total


def _detail(part: dict) -> object:
    inner = part.get("image_url")
    if isinstance(inner, dict):  # chat: {"type": "image_url", "image_url": {"url": …, "detail": …}}
        return inner.get("detail")
    return part.get("detail")  # Responses: {"type": "input_image", "image_url": "…", "detail": …}


def media_parts(payload: object) -> Media:
    """The non-text parts anywhere in a request body (a parsed JSON value)."""
    images = images_low = audio = files = chars = 0
    stack: list[tuple[object, int]] = [(payload, 0)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_DEPTH:
            continue
        if isinstance(item, list):
            stack.extend((each, depth + 1) for each in item)
            continue
        if not isinstance(item, dict):
            continue
        kind = item.get("type")
        if isinstance(kind, str) and kind in IMAGE_TYPES | AUDIO_TYPES | FILE_TYPES:
            if kind in IMAGE_TYPES:
                if _detail(item) == "low":
                    images_low += 1
                else:
                    images += 1
            elif kind in AUDIO_TYPES:
                audio += 1
            else:
                files += 1
            chars += _chars(item)
            continue
        stack.extend((each, depth + 1) for each in item.values())
    return Media(images, images_low, audio, files, chars)


def prompt_tokens_held(body_chars: int, media: Media, allowance: Allowance) -> int:
    """Prompt tokens a hold is priced for: the text around the parts by its size plus each part
    at its allowance — never fewer than the whole body's size gives."""
    by_size = estimate_tokens(body_chars)
    if not media:
        return by_size
    parts = (
        media.images * allowance.image
        + media.images_low * allowance.image_low
        + media.audio * allowance.audio
        + media.files * allowance.file
    )
    return max(by_size, estimate_tokens(max(body_chars - media.chars, 0)) + parts)
