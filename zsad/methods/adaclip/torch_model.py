"""AdaCLIP: hybrid static + dynamic learnable prompts in both CLIP towers, and hybrid semantic fusion (HSF).

Paper: Cao, Zhang, Frittoli, Cheng, Shen, Boracchi, "AdaCLIP: Adapting CLIP with Hybrid Learnable Prompts for
Zero-Shot Anomaly Detection", ECCV 2024; behaviour of the official code caoyunkang/AdaCLIP (e27ee32) where the two
disagree (``shared/specs/baselines.md`` §2 and §7).

For an image ``x`` of class ``c`` (``J`` = prompt depth 4, ``n`` = prompt length 5):

1. **Dynamic prompts.** ``e = proj(ln_post(CLS))`` of an unprompted frozen pass (:meth:`AdaCLIPModel.encode`);
   ``P^D_V = [W^V_i e + b^V_i]_{i=1..n}`` (vision width) and ``P^D_T = [W^T_i e + b^T_i]_{i=1..n}`` (text width).
2. **Visual prompts** ``P_V^j = S_V^j + P^D_V`` (rounded to fp16): appended after the tokens before block 0,
   replacing the last ``n`` tokens before blocks ``1..J−1`` (:func:`zsad.backbone.encode_image_with_prompts`).
   Patch tokens ``t_l`` of layers 6/12/18/24 (raw residual stream, class and prompt tokens dropped) and the global
   ``g = proj(ln_post(CLS))`` of this prompted pass.
3. **Text prompts** ``P_T^j = S_T^j + P^D_T`` (fp16): before text blocks ``1..J−1`` (0-based) hidden positions
   ``1..n`` of every sentence are overwritten (``S_T^0`` is never used, as in the official code). Sentences: the
   7 normal / 5 abnormal states × 4 templates of :data:`zsad.backbone.ensembles.ADACLIP` for the class word;
   ``T = [t_norm, t_abn]`` with ``t = L2(mean(L2(f_s)))`` over each state's sentences.
4. **Scores.** ``F_l = L2(Linear_l(t_l))``, ``A_l = 100 F_l T`` (``[N, 2]`` logits); ``ĉ = L2(Linear(g))``.
   HSF: ``a = softmax(mean_l A_l)[abn]``; the 100 most abnormal patches; k-means (20) on their concatenated
   4-layer features; ``F^I = L2(mean of the cluster centres)`` (each centre = mean of its members over all layers).
   Image score ``softmax(100 L2(0.2 F^I + 0.8 ĉ) T)[abn]``. Test map: bilinearly upsampled (align_corners=True)
   logits averaged over the layers, softmax, abnormal channel, Gaussian σ = 4.

Speed: text is re-encoded per image (the dynamic prompts depend on it), but all images' sentences go through the
text tower in one call per batch, cut to the longest sentence (the causal mask makes the padding irrelevant to the
EOT feature, so this is exact), starting after text block 0 whose output, untouched by any prompt, is computed once
per class and reused.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F  # noqa: N812
from anomalib.data import InferenceBatch
from torch import nn

from zsad.backbone import CLIPBackbone, encode_image_with_prompts, run_text_layers
from zsad.backbone.ensembles import ADACLIP, PromptEnsemble, class_word
from zsad.methods.adaclip.kmeans import kmeans, sklearn_kmeans
from zsad.methods.anomaly_map import GaussianSmoothing, patches_to_grid, upsample

#: Class words used unless the config overrides them: Gogan's categories are concrete blocks (seed 003).
DEFAULT_CLASS_WORDS: dict[str, str] = {"nunozumi": "concrete block", "tanizumi": "concrete block"}

#: Class word when a caller gives images without categories (e.g. ``zsad benchmark``, exported models).
FALLBACK_CLASS = "object"


def adaclip_class_word(category: str, overrides: dict[str, str] | None = None) -> str:
    """AdaCLIP's class word: an override (config, then Gogan's default), else the folder name with ``-`` → space."""
    words = {**DEFAULT_CLASS_WORDS, **(overrides or {})}
    if category in words:
        return class_word(category, words)
    return category.replace("-", " ")


class AdaCLIPModel(nn.Module):
    """AdaCLIP's learnable prompts, heads and scoring around a frozen CLIP backbone.

    Args:
        backbone: Frozen CLIP with its text tower (the official model: exact GELU, bicubic position table).
        layers: 1-based layers whose patch tokens are scored (6, 12, 18, 24).
        prompt_length: Tokens per prompt ``n`` (5).
        prompt_depth: Prompted blocks ``J`` counted from block 0 (4: visual blocks 0–3, text blocks 1–3).
        k_clusters: Clusters of the HSF k-means (20); the top ``5·k_clusters`` patches are clustered (official).
        use_hsf: Fuse the clustered patch features into the image feature (HSF); ``False`` scores ``ĉ`` alone.
        hsf_alpha: Weight of the HSF feature in the fused image feature (0.2).
        kmeans_seed: Seed of every image's k-means++ draws (scores are deterministic and batch-independent).
        kmeans_backend: ``"torch"`` (default: on the model's device, :func:`~.kmeans.kmeans`) or ``"sklearn"`` (the
            official ``KMeans(n_init="auto", random_state=kmeans_seed)`` on the CPU, for parity checks).
        logit_scale: Fixed similarity scale (100).
        sigma: Gaussian sigma of the test maps (4; 0 disables).
        init_std: Standard deviation of the static prompts' normal initialisation (0.02).
        fp16_prompts: Round the prompts to float16 before they enter the towers (the official ``.half()``; values
            and gradients).
        class_words: Category → class word overrides (merged over :data:`DEFAULT_CLASS_WORDS`).
        ensemble: The state × template sentence ensemble (:data:`zsad.backbone.ensembles.ADACLIP`).
    """

    def __init__(
        self,
        backbone: CLIPBackbone,
        layers: Sequence[int] = (6, 12, 18, 24),
        prompt_length: int = 5,
        prompt_depth: int = 4,
        k_clusters: int = 20,
        use_hsf: bool = True,
        hsf_alpha: float = 0.2,
        kmeans_seed: int = 111,
        kmeans_backend: str = "torch",
        logit_scale: float = 100.0,
        sigma: float = 4.0,
        init_std: float = 0.02,
        fp16_prompts: bool = True,
        class_words: dict[str, str] | None = None,
        ensemble: PromptEnsemble = ADACLIP,
    ) -> None:
        super().__init__()
        if not backbone.has_text:
            msg = "AdaCLIP prompts the text tower: build the backbone with load_text=True."
            raise ValueError(msg)
        self.layers = tuple(int(k) for k in layers)
        if not self.layers or any(not 1 <= k <= backbone.num_layers for k in self.layers):
            msg = f"layers must be non-empty 1-based layers in 1..{backbone.num_layers}, got {self.layers}."
            raise ValueError(msg)
        n_text = backbone.text.config.num_hidden_layers
        if not 2 <= prompt_depth <= min(n_text, backbone.num_layers):
            msg = f"prompt_depth must be in 2..{min(n_text, backbone.num_layers)}, got {prompt_depth}."
            raise ValueError(msg)
        if kmeans_backend not in ("torch", "sklearn"):
            msg = f"kmeans_backend must be 'torch' or 'sklearn', got {kmeans_backend!r}."
            raise ValueError(msg)
        if prompt_length < 1 or k_clusters < 1:
            msg = f"prompt_length and k_clusters must be positive, got {prompt_length} and {k_clusters}."
            raise ValueError(msg)
        self.backbone = backbone
        self.prompt_length = prompt_length
        self.prompt_depth = prompt_depth
        self.k_clusters = k_clusters
        self.hsf_tokens = 5 * k_clusters  # official n_aggregate_patch_tokens
        self.use_hsf = use_hsf
        self.hsf_alpha = hsf_alpha
        self.kmeans_seed = kmeans_seed
        self.kmeans_backend = kmeans_backend
        self.logit_scale = logit_scale
        self.fp16_prompts = fp16_prompts
        self.class_words = dict(class_words or {})
        self.ensemble = ensemble

        width, text_width, embed = backbone.width, backbone.text_width, backbone.embed_dim
        # Official names: visual_prompter / text_prompter.static_prompts, dynamic_{visual,text}_prompt_generator,
        # patch_token_layer, cls_token_layer (see lightning_model.OFFICIAL_KEYS).
        self.visual_static = nn.ParameterList(
            nn.Parameter(torch.randn(prompt_length, width) * init_std) for _ in range(prompt_depth)
        )
        self.text_static = nn.ParameterList(
            nn.Parameter(torch.randn(prompt_length, text_width) * init_std) for _ in range(prompt_depth)
        )
        self.visual_dynamic = nn.ModuleList(nn.Linear(embed, width) for _ in range(prompt_length))
        self.text_dynamic = nn.ModuleList(nn.Linear(embed, text_width) for _ in range(prompt_length))
        self.patch_heads = nn.ModuleList(nn.Linear(width, embed) for _ in self.layers)
        self.global_head = nn.Linear(embed, embed)
        self.smoothing = GaussianSmoothing(sigma)
        # Per class word: sentence token ids cut to the longest sentence, EOT positions, and the output of text block
        # 0 (no prompt reaches it, so it never changes). Not a buffer: rebuilt from the frozen tower on demand.
        self._text_cache: dict[str, tuple[torch.Tensor, torch.Tensor, int]] = {}

    # -- frozen part ------------------------------------------------------------------------------------------------

    def encode_config(self) -> dict[str, object]:
        """What :meth:`encode` depends on besides the backbone and the input."""
        return {"global_ln_post": True, "prompted": False}

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """The unprompted frozen pass: ``global`` ``[B, E]`` = ``proj(ln_post(CLS))``, the dynamic prompts' input."""
        return {"global": self.backbone.encode_image(images, layers=(), project=False).global_embedding}

    # -- prompts ----------------------------------------------------------------------------------------------------

    def _round(self, prompt: torch.Tensor) -> torch.Tensor:
        return prompt.half().float() if self.fp16_prompts else prompt

    def dynamic_prompts(self, image_embedding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(P^D_V [B, n, width], P^D_T [B, n, text_width])`` from the frozen global embeddings ``[B, E]``."""
        e = image_embedding.to(self.global_head.weight.dtype)
        visual = torch.stack([head(e) for head in self.visual_dynamic], dim=1)
        text = torch.stack([head(e) for head in self.text_dynamic], dim=1)
        return visual, text

    def visual_prompts(self, dynamic: torch.Tensor) -> list[torch.Tensor]:
        """``[B, n, width]`` prompts of visual blocks ``0..J−1``: static + dynamic, fp16-rounded."""
        return [self._round(static.unsqueeze(0) + dynamic) for static in self.visual_static]

    # -- text -------------------------------------------------------------------------------------------------------

    def class_word(self, category: str) -> str:
        """The class word of a category (config override, Gogan default, else the name with ``-`` → space)."""
        return adaclip_class_word(category, self.class_words)

    def _class_text(self, word: str) -> tuple[torch.Tensor, torch.Tensor, int]:
        """``(block-0 output [S, T, W], EOT [S], n_normal)`` of a class's sentences, cached per class word."""
        device = self.backbone.text_projection.weight.device
        cached = self._text_cache.get(word)
        if cached is None or cached[0].device != device:
            normal, abnormal = self.ensemble.sentences(word)
            ids = self.backbone.tokenizer([*normal, *abnormal]).to(device)
            eot = ids.argmax(dim=-1)
            length = int(eot.max()) + 1
            if length <= self.prompt_length + 1:
                msg = f"Sentences for {word!r} are shorter than the {self.prompt_length} prompt positions they hold."
                raise ValueError(msg)
            text = self.backbone.text
            ids = ids[:, :length]
            with torch.no_grad(), torch.inference_mode(False):
                h = text.embeddings.token_embedding(ids) + text.embeddings.position_embedding.weight[:length]
                mask = torch.full((length, length), torch.finfo(h.dtype).min, device=device).triu(1)[None, None]
                h = text.encoder.layers[0](h, mask.to(h.dtype))
            cached = (h, eot, len(normal))
            self._text_cache[word] = cached
        return cached

    def text_features(self, categories: Sequence[str], dynamic_text: torch.Tensor) -> torch.Tensor:
        """``[B, E, 2]`` per-image (normal, abnormal) text features, all images' sentences in one text-tower call.

        Args:
            categories: One category per image.
            dynamic_text: ``[B, n, text_width]`` dynamic text prompts.
        """
        words = [self.class_word(c) for c in categories]
        texts = [self._class_text(w) for w in words]
        length = max(t[0].shape[1] for t in texts)
        hidden, eots, counts = [], [], []
        for h, eot, _ in texts:
            # Pad shorter classes after their EOT: the causal mask keeps padding out of every EOT feature.
            hidden.append(F.pad(h, (0, 0, 0, length - h.shape[1])))
            eots.append(eot)
            counts.append(h.shape[0])
        hidden = torch.cat(hidden)
        deep = {}
        for index in range(1, self.prompt_depth):
            per_image = self._round(self.text_static[index].unsqueeze(0) + dynamic_text)  # [B, n, W]
            deep[index] = torch.cat([p.unsqueeze(0).expand(c, -1, -1) for p, c in zip(per_image, counts, strict=True)])
        features = run_text_layers(
            self.backbone.text,
            self.backbone.text_projection,
            hidden.to(dynamic_text.dtype),
            torch.cat(eots),
            start=1,
            deep_prompts=deep,
        )
        features = F.normalize(features.float(), dim=-1)
        out = []
        for chunk, (_, _, n_normal) in zip(features.split(counts), texts, strict=True):
            states = [F.normalize(chunk[:n_normal].mean(0), dim=-1), F.normalize(chunk[n_normal:].mean(0), dim=-1)]
            out.append(torch.stack(states, dim=1))
        return torch.stack(out)

    def clear_text_cache(self) -> None:
        """Forget the per-class block-0 text states."""
        self._text_cache.clear()

    # -- HSF --------------------------------------------------------------------------------------------------------

    def hybrid_semantic_fusion(self, patch_features: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """``[B, E]`` HSF features (code version: L2 of the mean of all cluster centres).

        Args:
            patch_features: ``[B, L, N, E]`` normalised patch features.
            logits: ``[B, L, N, 2]`` patch logits.
        """
        abnormal = logits.mean(dim=1).softmax(dim=-1)[..., 1]  # [B, N]
        k = min(abnormal.shape[1], self.hsf_tokens)
        top = abnormal.topk(k, dim=1).indices  # [B, k]
        index = top[:, None, :, None].expand(-1, patch_features.shape[1], -1, patch_features.shape[-1])
        selected = patch_features.gather(2, index)  # [B, L, k, E]
        fused = []
        for b in range(selected.shape[0]):
            stacked = selected[b].permute(1, 0, 2).reshape(k, -1)  # [k, L*E]: the layers' features side by side
            cluster = kmeans if self.kmeans_backend == "torch" else sklearn_kmeans
            labels = cluster(stacked, min(self.k_clusters, k), seed=self.kmeans_seed)
            # Cluster centre = mean over its members of all layers' tokens = mean over members of the layer-mean.
            member_means = selected[b].mean(dim=0)  # [k, E]
            sums = member_means.new_zeros(self.k_clusters, member_means.shape[1]).index_add(0, labels, member_means)
            counts = torch.bincount(labels, minlength=self.k_clusters)
            occupied = counts > 0  # k-means leaves no cluster empty; guard anyway (the official mean would be NaN)
            fused.append((sums[occupied] / counts[occupied, None].to(sums.dtype)).mean(dim=0))
        return F.normalize(torch.stack(fused), dim=-1)

    # -- forward ----------------------------------------------------------------------------------------------------

    def forward_features(
        self,
        images: torch.Tensor,
        categories: Sequence[str] | None = None,
        features: dict[str, torch.Tensor] | None = None,
        full_maps: bool | None = None,
    ) -> dict[str, torch.Tensor]:
        """Prompted forward and scores.

        Args:
            images: ``[B, 3, S, S]`` normalised images.
            categories: One category per image (``None``: the class word ``"object"`` for all).
            features: :meth:`encode`'s output if already computed.
            full_maps: Return the upsampled per-layer probability maps (the loss needs them); default in training.

        Returns:
            ``image_probs`` ``[B, 2]``, ``image_score`` ``[B]``, ``patch_logits`` ``[B, L, N, 2]``, ``anomaly_map``
            ``[B, S, S]`` (unsmoothed) and with ``full_maps`` ``maps`` ``[B, L, 2, S, S]`` (per-layer softmax).
        """
        if full_maps is None:
            full_maps = self.training
        batch = images.shape[0]
        if categories is None:
            categories = [FALLBACK_CLASS] * batch
        if len(categories) != batch:
            msg = f"{len(categories)} categories for {batch} images."
            raise ValueError(msg)
        if features is None:
            features = self.encode(images)
        dynamic_visual, dynamic_text = self.dynamic_prompts(features["global"])
        vision = encode_image_with_prompts(
            self.backbone, images, self.visual_prompts(dynamic_visual), layers=self.layers, project=False
        )
        text = self.text_features(categories, dynamic_text)  # [B, E, 2]
        heads = zip(self.patch_heads, vision.patch_tokens, strict=True)
        patches = torch.stack(
            [F.normalize(head(t.to(head.weight.dtype)).float(), dim=-1) for head, t in heads], dim=1
        )  # [B, L, N, E]
        image_feature = F.normalize(
            self.global_head(vision.global_embedding.to(self.global_head.weight.dtype)).float(), dim=-1
        )
        logits = self.logit_scale * patches @ text.unsqueeze(1)  # [B, L, N, 2]
        if self.use_hsf:
            fused = self.hsf_alpha * self.hybrid_semantic_fusion(patches, logits) + (1 - self.hsf_alpha) * image_feature
            image_feature = F.normalize(fused, dim=-1)
        image_probs = (self.logit_scale * image_feature.unsqueeze(1) @ text).squeeze(1).softmax(dim=-1)
        size = tuple(images.shape[-2:])
        n_layers = len(self.layers)
        grid_logits = patches_to_grid(logits.flatten(0, 1), vision.grid)  # [B*L, 2, h, w]
        # Upsampling is linear: averaging the layers' logits before upsampling equals the official order.
        mean_logits = upsample(grid_logits.view(batch, n_layers, 2, *vision.grid).mean(1), size, "bilinear", True)
        out = {
            "image_probs": image_probs,
            "image_score": image_probs[:, 1],
            "patch_logits": logits,
            "anomaly_map": mean_logits.softmax(dim=1)[:, 1],
        }
        if full_maps:
            maps = upsample(grid_logits, size, "bilinear", True).softmax(dim=1)
            out["maps"] = maps.view(batch, n_layers, 2, *size)
        return out

    def forward(
        self,
        images: torch.Tensor,
        categories: Sequence[str] | None = None,
    ) -> dict[str, torch.Tensor] | InferenceBatch:
        """Training: the dict of :meth:`forward_features`; evaluation: ``InferenceBatch`` with the smoothed map."""
        out = self.forward_features(images, categories)
        if self.training:
            return out
        return InferenceBatch(pred_score=out["image_score"], anomaly_map=self.smoothing(out["anomaly_map"]))
