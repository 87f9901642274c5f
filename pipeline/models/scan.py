"""SCAN (Stacked Cross Attention, Lee et al. ECCV 2018): encoders plus the cross-attention score.

The score itself is `pipeline/models/xattn.py`; the options are `ScanConfig` (`pipeline/models/config.py`).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from pipeline.models.config import ScanConfig
from pipeline.models.encoders import ImageEncoder, TextEncoder
from pipeline.models.xattn import BlockSize, xattn_scores


class SCAN(nn.Module):
    """Image encoder + text encoder + stacked cross attention scoring."""

    def __init__(self, config: ScanConfig) -> None:
        super().__init__()
        self.config = config
        self.image_encoder = ImageEncoder(config.img_dim, config.embed_size, no_imgnorm=config.no_imgnorm)
        self.text_encoder = TextEncoder(
            config.vocab_size,
            config.word_dim,
            config.embed_size,
            num_layers=config.num_layers,
            bidirectional=config.bidirectional,
            no_txtnorm=config.no_txtnorm,
        )

    def encode_images(self, region_features: Tensor, region_lengths: Tensor | None = None) -> Tensor:
        """(B, R, img_dim) region features -> (B, R, embed) region embeddings (padded regions zero)."""
        return self.image_encoder(region_features, region_lengths)

    def encode_captions(self, token_ids: Tensor, caption_lengths: Tensor) -> Tensor:
        """(B, L) token ids -> (B, L, embed) word embeddings (padded words zero)."""
        return self.text_encoder(token_ids, caption_lengths)

    def similarity(
        self,
        img_emb: Tensor,
        cap_emb: Tensor,
        caption_lengths: Tensor,
        region_lengths: Tensor | None = None,
        block_size: BlockSize | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> Tensor:
        """(n_img, n_cap) cross-attention scores with this model's attention options."""
        config = self.config
        return xattn_scores(
            img_emb,
            cap_emb,
            caption_lengths,
            direction=config.direction,
            raw_feature_norm=config.raw_feature_norm,
            agg=config.agg,
            lambda_softmax=config.lambda_softmax,
            lambda_lse=config.lambda_lse,
            region_lengths=region_lengths,
            block_size=block_size,
            progress=progress,
        )

    def forward(
        self,
        region_features: Tensor,
        region_lengths: Tensor | None,
        token_ids: Tensor,
        caption_lengths: Tensor,
    ) -> Tensor:
        """In-batch score matrix `(B, B)`: image i against caption j, positives on the diagonal."""
        img_emb = self.encode_images(region_features, region_lengths)
        cap_emb = self.encode_captions(token_ids, caption_lengths)
        batch = max(img_emb.shape[0], cap_emb.shape[0])
        return self.similarity(img_emb, cap_emb, caption_lengths, region_lengths, block_size=batch)
