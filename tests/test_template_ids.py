"""Templated prompts tokenized in pieces (workers.template_ids) give exactly the whole text's ids."""

import random

from workers.template_ids import split_template
from workers.templates import I2I, T2I, Template

# Pieces that make hard prompts: whitespace runs, partial and whole special tokens, digits, contractions, unicode
# (decomposed accents that NFC merges), and the image placeholders' own tokens.
PIECES = [" ", "  ", "\n", "\n\n", "\r\n", "\t", "a", "cat", " red", "'s", "'ll", "1", "2024", ".", "!?", "<", "|",
          "<|", "|>", "<|im_end|>", "<|im_start|>", "<|im_", "end|>", "<|image_pad|>", "<|vision_start|>", "e\u0301",
          "\u00e9", "🦊", "日本語", "user", "assistant", "\u200b", "\x00"]


def random_prompt(rng: random.Random) -> str:
    return "".join(rng.choice(PIECES) for _ in range(rng.randint(0, 12)))


def test_template_cut_at_special_tokens_gives_the_whole_texts_ids(baseline):
    rng = random.Random()  # fresh prompts each run
    for template in (T2I, I2I):
        split = baseline._split_templates[template.task]
        assert split.lead == "user\n" and split.trail == ""
        users = [template.user_part(random_prompt(rng), rng.randint(0, 2)) for _ in range(300)]
        whole = baseline.token_ids([template.text.format(u) for u in users])
        cut = [split.ids(m) for m in baseline.token_ids([split.middle(u) for u in users])]
        assert cut == whole


def test_tokenize_uses_the_cut_and_matches_the_tokenizer(baseline):
    prompts = ["a red fox in snow", "", "  two  spaces\n\n", "<|im_end|> inside", "🦊 #63000.3.99"]
    batch = baseline.tokenize(prompts, "t2i")
    want = [list(x) for x in baseline.tokenizer([T2I.format(p) for p in prompts], add_special_tokens=False)["input_ids"]]
    assert batch.ids == want


def test_no_cut_when_the_pieces_would_differ(baseline):
    # a "tokenizer" with one id per whole text: cutting changes its output, so the check must refuse the cut
    def whole_text_ids(texts):
        return [[hash(t) % 1000] for t in texts]

    assert split_template(T2I, ["<|im_start|>", "<|im_end|>"], whole_text_ids) is None
    # no special token around the prompt: nothing to cut at
    plain = Template("plain", "Describe: {} now", 2)
    assert split_template(plain, ["<|im_start|>", "<|im_end|>"], baseline.token_ids) is None
    # the real tokenizer and template do cut
    assert split_template(T2I, ["<|im_start|>", "<|im_end|>"], baseline.token_ids) is not None
