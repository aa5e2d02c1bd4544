"""APRIL-GAN: per-layer linear maps from frozen CLIP patch tokens into the text space of a fixed prompt ensemble.

Report: Chen, Han, Zhang, "A Zero-/Few-Shot Anomaly Classification and Segmentation Method for CVPR 2023 VAND
Workshop Challenge Tracks 1&2" (arXiv 2305.17382); behaviour of the official repository ByChelsea/VAND-APRIL-GAN
(``shared/specs/baselines.md`` §1, §7).

Text side (fixed, class-aware). For the class word ``c`` of a sample, 7 normal and 5 abnormal states crossed with
35 templates give 245 + 175 sentences (:data:`zsad.backbone.ensembles.APRIL_GAN`). Per state: L2-normalise each
sentence embedding, average, L2-normalise again::

    T(c) = [t_normal, t_abnormal]   ∈ R^{E×2}

Image side (frozen CLIP, learnable heads). For each layer ``l`` ∈ {6, 12, 18, 24} the raw residual tokens
``h^(l)[:, 1:]`` (no ``ln_post``, no projection) pass through a learnable ``Linear_l(width → E)``::

    F_l = normalise(Linear_l(h^(l)[:, 1:]))                      [B, N, E]
    A_l = 100 · F_l · T(c)                                       [B, N, 2] → grid [B, 2, h, w]
    S_l = softmax_channels(bilinear_align_corners(A_l → S×S))    upsample the logits, then softmax
    map = Σ_l S_l[abnormal]                                      range [0, L], no smoothing
    score = softmax(100 · ĝ · T(c))[abnormal]                    ĝ the frozen, normalised CLIP image embedding

The image score never sees the heads: zero-shot APRIL-GAN classifies with plain CLIP. Since ``T(c)`` does not depend
on the image, it is encoded once per class word and kept for the run (:meth:`APRILGANModel.text_features`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F  # noqa: N812
from anomalib.data import InferenceBatch
from torch import nn

from zsad.backbone import CLIPBackbone
from zsad.backbone.ensembles import APRIL_GAN, PromptEnsemble, class_word
from zsad.methods.anomaly_map import patches_to_grid, upsample
from zsad.methods.checkpoint_io import OfficialCheckpointError, check_finite, read_checkpoint_file

#: The class word used when a caller gives no categories (``model(images)``: benchmarks, exported models).
DEFAULT_CLASS_WORD = "object"
#: Key of the heads in the official checkpoints (``torch.save({"trainable_linearlayer": ...})``).
OFFICIAL_KEY = "trainable_linearlayer"
OFFICIAL_WHAT = "APRIL-GAN checkpoint (exps/pretrained/*.pth)"


class APRILGANModel(nn.Module):
    """APRIL-GAN's linear heads and scoring around a frozen CLIP backbone.

    Args:
        backbone: Frozen CLIP with its text tower (built with exact GELU and an antialiased bicubic position table
            for the official model).
        layers: 1-based layers whose residual tokens are mapped (official ``--features_list 6 12 18 24``).
        class_words: ``category → class word`` used in the prompts; categories not listed use their raw folder
            name (the official behaviour, e.g. ``metal_nut``).
        ensemble: Normal / abnormal states and templates (APRIL-GAN's 7 × 5 × 35).
        logit_scale: Fixed scale of the cosine similarities (100 in the official code).
    """

    def __init__(
        self,
        backbone: CLIPBackbone,
        layers: Sequence[int] = (6, 12, 18, 24),
        class_words: Mapping[str, str] | None = None,
        ensemble: PromptEnsemble = APRIL_GAN,
        logit_scale: float = 100.0,
    ) -> None:
        super().__init__()
        if not backbone.has_text:
            msg = "APRIL-GAN scores against a text prompt ensemble: build the backbone with load_text=True."
            raise ValueError(msg)
        self.layers = tuple(int(k) for k in layers)
        if not self.layers or any(not 1 <= k <= backbone.num_layers for k in self.layers):
            msg = f"APRIL-GAN layers must be a non-empty subset of 1..{backbone.num_layers}, got {self.layers}."
            raise ValueError(msg)
        self.backbone = backbone
        self.class_words = dict(class_words or {})
        self.ensemble = ensemble
        self.logit_scale = float(logit_scale)
        # Official name: LinearLayer.fc.{i} (nn.Linear with bias, PyTorch's default initialisation).
        self.heads = nn.ModuleList(nn.Linear(backbone.width, backbone.embed_dim) for _ in self.layers)
        self._text: dict[str, torch.Tensor] = {}

    # -- text side --------------------------------------------------------------------------------------------------

    def class_word(self, category: str) -> str:
        """The word the prompts use for ``category`` (configured override, else the raw folder name)."""
        return class_word(category, self.class_words)

    def encode_class(self, word: str) -> torch.Tensor:
        """``[E, 2]`` normalised (normal, abnormal) text features of one class word: one text-tower call.

        Per state: normalise every sentence embedding, average, normalise (official ``prompt_ensemble.py``).
        """
        normal, abnormal = self.ensemble.sentences(word)
        ids = self.backbone.tokenizer(normal + abnormal).to(self.heads[0].weight.device)
        eot = ids.argmax(dim=-1)  # OpenAI pooling position: the end-of-text token has the largest id
        # Under the causal mask nothing after the longest sentence's EOT reaches any pooled position, so the tower
        # runs on that prefix (~20 of 77 positions): the same features, ~4x fewer FLOPs than the padded context.
        ids = ids[:, : int(eot.max()) + 1]
        with torch.no_grad():
            embeddings = self.backbone.text.embeddings.token_embedding(ids)
            features = self.backbone.encode_prompt_embeddings(embeddings, eot)
        features = F.normalize(features.float(), dim=-1)
        pooled = torch.stack([features[: len(normal)].mean(dim=0), features[len(normal) :].mean(dim=0)], dim=1)
        return F.normalize(pooled, dim=0)

    def text_features(self, categories: Sequence[str] | None, batch_size: int) -> torch.Tensor:
        """``[B, E, 2]`` text features of each sample's class, encoded once per class word and then reused.

        Args:
            categories: One category per sample (``batch.category``), or ``None`` for :data:`DEFAULT_CLASS_WORD`.
            batch_size: ``B`` (used when ``categories`` is ``None``).
        """
        if categories is None:
            words = [DEFAULT_CLASS_WORD] * batch_size
        else:
            if len(categories) != batch_size:
                msg = f"{len(categories)} categories for a batch of {batch_size} images."
                raise ValueError(msg)
            words = [self.class_word(str(c)) for c in categories]
        device = self.heads[0].weight.device
        for word in dict.fromkeys(words):
            cached = self._text.get(word)
            if cached is None:
                cached = self.encode_class(word)
            elif cached.is_inference() and not torch.is_inference_mode_enabled():
                # Encoded during a validation/test loop (inference mode): autograd refuses to save such tensors for
                # backward, so training gets an ordinary copy (once; it replaces the cached one).
                cached = cached.clone()
            self._text[word] = cached.to(device)  # a no-op unless the model moved since
        return torch.stack([self._text[w] for w in words])

    def clear_text_cache(self) -> None:
        """Forget the per-class text features (they depend only on the frozen text tower, so this is rarely needed)."""
        self._text.clear()

    # -- image side -------------------------------------------------------------------------------------------------

    def encode_config(self) -> dict[str, object]:
        """What :meth:`encode` depends on besides the backbone and the input (the feature cache's key)."""
        return {"layers": list(self.layers), "tokens": "raw residual", "global": "proj(ln_post(cls))"}

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Frozen image features from one CLIP forward.

        Args:
            images: ``[B, 3, S, S]`` normalised images.

        Returns:
            ``global`` ``[B, E]`` (the CLIP image embedding ``proj(ln_post(h^(24)[CLS]))``) and ``patches``
            ``[B, L, N, width]`` (raw residual tokens ``h^(l)[:, 1:]`` of the chosen layers).
        """
        out = self.backbone.encode_image(images, layers=self.layers, project=False, global_ln_post=True)
        return {"global": out.global_embedding, "patches": torch.stack(out.patch_tokens, dim=1)}

    # -- scores -----------------------------------------------------------------------------------------------------

    def forward_features(
        self,
        features: dict[str, torch.Tensor],
        image_size: tuple[int, int],
        categories: Sequence[str] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Score frozen features against each sample's class text.

        Args:
            features: The output of :meth:`encode`.
            image_size: ``(H, W)`` of the input images (the maps' size).
            categories: One category per sample; ``None`` uses :data:`DEFAULT_CLASS_WORD` for all.

        Returns:
            ``image_logits`` ``[B, 2]``, ``image_score`` ``[B]``, ``maps`` ``[B, L, 2, H, W]`` (per-layer upsampled
            softmax maps, what the loss needs) and ``anomaly_map`` ``[B, H, W]`` (``Σ_l S_l[abnormal]``).
        """
        patches = features["patches"]
        batch, n_layers, n_patches, _ = patches.shape
        if n_layers != len(self.heads):
            msg = f"Features hold {n_layers} layers, the model has {len(self.heads)} heads (layers {self.layers})."
            raise ValueError(msg)
        grid = (image_size[0] // self.backbone.patch_size, image_size[1] // self.backbone.patch_size)
        if grid[0] * grid[1] != n_patches:
            msg = f"{n_patches} patch tokens do not form the {grid} grid of a {tuple(image_size)} image."
            raise ValueError(msg)
        text = self.text_features(categories, batch)  # [B, E, 2]
        dtype = self.heads[0].weight.dtype
        text = text.to(dtype)
        global_embedding = F.normalize(features["global"].to(dtype), dim=-1)
        image_logits = self.logit_scale * torch.einsum("be,bec->bc", global_embedding, text)
        maps = []
        for index, head in enumerate(self.heads):
            tokens = F.normalize(head(patches[:, index].to(dtype)), dim=-1)  # [B, N, E]
            logits = self.logit_scale * tokens @ text  # [B, N, 2]
            logits = upsample(patches_to_grid(logits, grid), image_size, mode="bilinear", align_corners=True)
            maps.append(logits.float().softmax(dim=1))  # softmax after upsampling the logits, like the official code
        stacked = torch.stack(maps, dim=1)  # [B, L, 2, H, W]
        return {
            "image_logits": image_logits.float(),
            "image_score": image_logits.float().softmax(dim=-1)[:, 1],
            "maps": stacked,
            "anomaly_map": stacked[:, :, 1].sum(dim=1),
        }

    def forward(
        self, images: torch.Tensor, categories: Sequence[str] | None = None
    ) -> dict[str, torch.Tensor] | InferenceBatch:
        """Training: the dict of :meth:`forward_features`; evaluation: ``InferenceBatch`` (map unsmoothed, float32)."""
        out = self.forward_features(self.encode(images), (images.shape[-2], images.shape[-1]), categories)
        if self.training:
            return out
        return InferenceBatch(pred_score=out["image_score"], anomaly_map=out["anomaly_map"])

    # -- official weights -------------------------------------------------------------------------------------------

    def load_official_checkpoint(self, path_or_state_dict: str | os.PathLike | Mapping[str, torch.Tensor]) -> None:
        """Load released heads (``{"trainable_linearlayer": {"fc.{i}.weight", "fc.{i}.bias"}}`` or the inner dict).

        Every key and shape is checked against this model (``len(layers)`` heads of ``width → E``); nothing is
        loaded unless all of them fit.

        Raises:
            FileNotFoundError: The file does not exist.
            OfficialCheckpointError: Unreadable file, not a dict, missing / unknown keys, wrong shapes, non-tensors
                or non-finite values; the message names the file.
        """
        if isinstance(path_or_state_dict, Mapping):
            raw, source = path_or_state_dict, "the given APRIL-GAN state dict"
        else:
            raw = read_checkpoint_file(path_or_state_dict, OFFICIAL_WHAT)
            source = repr(str(path_or_state_dict))
        state = raw.get(OFFICIAL_KEY, raw) if isinstance(raw, Mapping) else raw
        if not isinstance(state, Mapping):
            msg = f"{source}: {OFFICIAL_KEY!r} holds a {type(state).__name__}, not a state dict of the linear heads."
            raise OfficialCheckpointError(msg)
        expected = {
            f"fc.{i}.{name}": tuple(getattr(head, name).shape)
            for i, head in enumerate(self.heads)
            for name in ("weight", "bias")
        }
        missing = sorted(set(expected) - set(state))
        unknown = sorted(set(state) - set(expected))
        if missing or unknown:
            msg = (
                f"{source} is not an APRIL-GAN checkpoint for {len(self.heads)} layers {self.layers}: missing keys "
                f"{missing[:8]}, unknown keys {unknown[:8]} (expected {{'{OFFICIAL_KEY}': {{fc.0.weight, ...}}}})."
            )
            raise OfficialCheckpointError(msg)
        not_tensors = sorted(k for k in expected if not isinstance(state[k], torch.Tensor))
        if not_tensors:
            msg = f"{source}: {not_tensors[:8]} are not tensors."
            raise OfficialCheckpointError(msg)
        shapes = {k: tuple(state[k].shape) for k in expected if tuple(state[k].shape) != expected[k]}
        if shapes:
            msg = (
                f"{source}: wrong shapes {shapes} (this backbone needs Linear({self.backbone.width} → "
                f"{self.backbone.embed_dim}) per layer; the released heads are for ViT-L/14@336: 1024 → 768)."
            )
            raise OfficialCheckpointError(msg)
        check_finite({k: state[k] for k in expected}, source)
        with torch.no_grad():
            for i, head in enumerate(self.heads):
                head.weight.copy_(state[f"fc.{i}.weight"])
                head.bias.copy_(state[f"fc.{i}.bias"])
