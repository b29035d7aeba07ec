"""Qwen-Image's prompt templates: the text around the user's prompt and how many leading tokens to drop."""

from __future__ import annotations

from dataclasses import dataclass

from broker.errors import InvalidRequest

IMAGE_PROMPT = "Picture {}: <|vision_start|><|image_pad|><|vision_end|>"


@dataclass(frozen=True, slots=True)
class Template:
    task: str
    text: str  # holds one "{}" for the user part
    drop_idx: int  # tokens of the shared prefix; their hidden states are not returned

    @property
    def prefix(self) -> str:
        """The part every prompt of this task shares: exactly `drop_idx` tokens."""
        return self.text.split("{}")[0]

    def format(self, prompt: str, num_images: int = 0) -> str:
        return self.text.format(self.user_part(prompt, num_images))

    @staticmethod
    def user_part(prompt: str, num_images: int = 0) -> str:
        """What goes in the template's "{}": the images' placeholders, then the prompt."""
        return "".join(IMAGE_PROMPT.format(i + 1) for i in range(num_images)) + prompt


T2I = Template(
    task="t2i",
    text=(
        "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, "
        "spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
        "<|im_start|>assistant\n"
    ),
    drop_idx=34,
)
I2I = Template(
    task="i2i",
    text=(
        "<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, objects, "
        "background), then explain how the user's text instruction should alter or modify the image. Generate a "
        "new image that meets the user's requirements while maintaining consistency with the original input "
        "where appropriate.<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
    ),
    drop_idx=64,
)
TEMPLATES = {t.task: t for t in (T2I, I2I)}
TASKS = tuple(TEMPLATES)


def template_for(task: str) -> Template:
    try:
        return TEMPLATES[task]
    except KeyError:
        raise InvalidRequest(f"unknown task {task!r}: expected one of {', '.join(TASKS)}") from None
