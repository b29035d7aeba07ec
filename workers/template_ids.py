"""Token ids of templated prompts without tokenizing the template's fixed text again for every prompt.

A t2i prompt is ~30 tokens of the user's text inside a template of ~40 fixed ones; tokenizing the whole text is
most of the intake thread's time per job. A fast tokenizer cuts its input at special tokens before anything
else (normalizing, pre-tokenizing, BPE), so the ids of `head + middle + tail`, where head ends with a special
token and tail starts with one, are the ids of head, of middle and of tail, concatenated: head and tail are
tokenized once, each prompt's middle (the text between the two special tokens, e.g. "user\\n" + prompt) alone.
The split is checked against whole-text tokenization on prompts that press on its seams before it is used.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from workers.templates import IMAGE_PROMPT, Template

# Prompts that would show a tokenizer for which the cut is not exact: text that could merge with the template's
# text or its special tokens across the seams (whitespace, partial and whole special tokens, unicode, images).
SEAM_PROBES = ("", " ", "  ", "\n", "\n\n", "\r\n", "\t", "x", " x ", "user", "'s", "1", "<", "<|", "|>", "|",
               "<|im_end|>", "<|im_start|>", "<|im_end", "im_end|>", "a<|im_end|>b", "<|image_pad|>",
               IMAGE_PROMPT.format(1), "\u00e9e\u0301", "🦊 日本語", "a red fox in snow\n")


@dataclass(frozen=True, slots=True)
class SplitTemplate:
    head_ids: tuple[int, ...]  # the template through its last special token before the prompt
    lead: str  # the template's text between that token and the prompt
    trail: str  # the template's text between the prompt and its first special token after it
    tail_ids: tuple[int, ...]  # the template from that token on

    def middle(self, user_part: str) -> str:
        return self.lead + user_part + self.trail

    def ids(self, middle_ids: Iterable[int]) -> list[int]:
        return [*self.head_ids, *middle_ids, *self.tail_ids]


def split_template(template: Template, special_tokens: Iterable[str],
                   token_ids: Callable[[list[str]], list[list[int]]]) -> SplitTemplate | None:
    """The template cut at the special tokens around its prompt, or None when it has none there or when the cut
    tokens differ from the whole text's on any seam probe (`token_ids`: texts -> ids, no special tokens added)."""
    prefix, suffix = template.text.split("{}")
    specials = [s for s in special_tokens if s]
    ends = [prefix.rfind(s) + len(s) for s in specials if s in prefix]
    starts = [suffix.find(s) for s in specials if s in suffix]
    if not ends or not starts:
        return None
    cut_head, cut_tail = max(ends), min(starts)
    head_ids, tail_ids = token_ids([prefix[:cut_head], suffix[cut_tail:]])
    split = SplitTemplate(tuple(head_ids), prefix[cut_head:], suffix[:cut_tail], tuple(tail_ids))
    user_parts = [p for probe in SEAM_PROBES for p in (probe, IMAGE_PROMPT.format(1) + probe)]
    whole = token_ids([template.text.format(p) for p in user_parts])
    cut = [split.ids(m) for m in token_ids([split.middle(p) for p in user_parts])]
    return split if cut == whole else None
