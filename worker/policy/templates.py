"""Named prompt-template sets a policy can refer to with ``templates: NAME``.

Each template is a ``str.format`` string with exactly one ``{}`` where the prompt goes.
"""

from __future__ import annotations

from open_clip import OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES

# open_clip keeps its sets as ``lambda c: f"... {c} ..."``; calling one with "{}" gives back
# the format string, so these are exactly the strings open_clip would produce.
_DEFAULT = tuple(t("{}") for t in OPENAI_IMAGENET_TEMPLATES)
_SIMPLE = tuple(t("{}") for t in SIMPLE_IMAGENET_TEMPLATES)

# For prompts that are descriptive phrases with their own article ("a person holding a
# knife"), where "a photo of a {}" would read "a photo of a a person ...".
_SCENE = (
    "a photo of {}.",
    "a picture of {}.",
    "an image showing {}.",
    "a close-up photo of {}.",
    "a blurry photo of {}.",
    "a cropped photo of {}.",
    "a screenshot showing {}.",
    "a drawing of {}.",
)

TEMPLATE_SETS: dict[str, tuple[str, ...]] = {
    "default": _DEFAULT,  # the 80 CLIP ImageNet templates
    "simple": _SIMPLE,  # the 7-template subset from the CLIP notebook, near-equal accuracy
    "scene": _SCENE,  # for phrases that carry their own article
    "none": ("{}",),  # the prompt as written
}


def template_problem(template: str) -> str | None:
    """Why ``template`` is unusable, or None when it is fine."""
    if template.count("{}") != 1:
        return f"template {template!r} must contain exactly one '{{}}' where the prompt goes"
    try:
        template.format("x")
    except (IndexError, KeyError, ValueError):
        return f"template {template!r} has braces other than one '{{}}'; double them to escape"
    return None
