"""Class-aware fixed prompt ensembles of the CLIP baselines (APRIL-GAN, AdaCLIP, WinCLIP).

Each baseline builds ``template.format(state.format(class_name))`` for every state and template; the lists are the
official repositories' (``shared/specs/baselines.md`` §1-3), kept here once so that no two methods hold copies.
How the sentences' features are pooled differs per method (APRIL-GAN and AdaCLIP: normalise, mean, normalise;
WinCLIP: mean of un-normalised features) and stays in each method.
"""

from __future__ import annotations

from dataclasses import dataclass

#: The 7 normal states shared by APRIL-GAN, AdaCLIP and WinCLIP.
NORMAL_STATES: tuple[str, ...] = (
    "{}",
    "flawless {}",
    "perfect {}",
    "unblemished {}",
    "{} without flaw",
    "{} without defect",
    "{} without damage",
)

#: APRIL-GAN's and AdaCLIP's 5 abnormal states.
ABNORMAL_STATES: tuple[str, ...] = ("damaged {}", "broken {}", "{} with flaw", "{} with defect", "{} with damage")

#: WinCLIP's (anomalib 2.7) 4 abnormal states: APRIL-GAN's without "broken {}".
WINCLIP_ABNORMAL_STATES: tuple[str, ...] = ("damaged {}", "{} with flaw", "{} with defect", "{} with damage")

#: APRIL-GAN's 35 templates (VAND-APRIL-GAN ``prompt_ensemble.py``). Every method pools the sentences by a mean, so
#: the order does not change any feature; the first four are AdaCLIP's.
APRIL_GAN_TEMPLATES: tuple[str, ...] = (
    "a bad photo of a {}.",
    "a low resolution photo of the {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a bright photo of a {}.",
    "a dark photo of the {}.",
    "a photo of my {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a photo of one {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "a low resolution photo of a {}.",
    "a photo of a large {}.",
    "a blurry photo of a {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a photo of the small {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "a dark photo of a {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "there is a {} in the scene.",
    "there is the {} in the scene.",
    "this is a {} in the scene.",
    "this is the {} in the scene.",
    "this is one {} in the scene.",
)

#: AdaCLIP's 4 templates (the first four of APRIL-GAN's).
ADACLIP_TEMPLATES: tuple[str, ...] = APRIL_GAN_TEMPLATES[:4]

#: WinCLIP's 21 templates as anomalib 2.7 lists them ("a jpeg corrupted photo of the {}." twice, no "of a" variant).
WINCLIP_TEMPLATES: tuple[str, ...] = (
    "a cropped photo of the {}.",
    "a close-up photo of a {}.",
    "a close-up photo of the {}.",
    "a bright photo of a {}.",
    "a bright photo of the {}.",
    "a dark photo of the {}.",
    "a dark photo of a {}.",
    "a jpeg corrupted photo of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a blurry photo of the {}.",
    "a blurry photo of a {}.",
    "a photo of a {}.",
    "a photo of the {}.",
    "a photo of a small {}.",
    "a photo of the small {}.",
    "a photo of a large {}.",
    "a photo of the large {}.",
    "a photo of the {} for visual inspection.",
    "a photo of a {} for visual inspection.",
    "a photo of the {} for anomaly detection.",
    "a photo of a {} for anomaly detection.",
)


@dataclass(frozen=True)
class PromptEnsemble:
    """Normal and abnormal states crossed with templates.

    Attributes:
        normal_states: Format strings with one ``{}`` for the class name.
        abnormal_states: Likewise.
        templates: Format strings with one ``{}`` for the stated class.
    """

    normal_states: tuple[str, ...]
    abnormal_states: tuple[str, ...]
    templates: tuple[str, ...]

    def sentences(self, class_name: str) -> tuple[list[str], list[str]]:
        """``(normal, abnormal)`` sentences for ``class_name``, state-major then template."""
        normal = [t.format(s.format(class_name)) for s in self.normal_states for t in self.templates]
        abnormal = [t.format(s.format(class_name)) for s in self.abnormal_states for t in self.templates]
        return normal, abnormal


APRIL_GAN = PromptEnsemble(NORMAL_STATES, ABNORMAL_STATES, APRIL_GAN_TEMPLATES)
ADACLIP = PromptEnsemble(NORMAL_STATES, ABNORMAL_STATES, ADACLIP_TEMPLATES)
WINCLIP = PromptEnsemble(NORMAL_STATES, WINCLIP_ABNORMAL_STATES, WINCLIP_TEMPLATES)


def class_word(category: str, overrides: dict[str, str] | None = None) -> str:
    """The class word of a category: an explicit override, else the raw folder name (APRIL-GAN's choice).

    The official code passes raw folder names (``metal_nut``) to APRIL-GAN and replaces ``-`` by a space in AdaCLIP;
    methods that must match their official code bit for bit pass their own mapping through ``overrides``.
    """
    if overrides and category in overrides:
        return overrides[category]
    return category
