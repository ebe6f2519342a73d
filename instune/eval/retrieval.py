"""Zero-shot retrieval with a vision-language model: recall@1/5 image->text and text->image, per domain.

No retrieval head and no training on captions: every (image, caption) pair of a domain's pool is scored by the
model's mean log-likelihood of the caption's tokens given the image and a fixed prompt (the generative
scoring of Lin et al. 2024, "VQAScore"/"Evaluating text-to-visual generation with image-to-text
generation"). The mean, not the sum, so a short caption is not preferred for being short (image->text ranks
captions of different lengths; text->image ranks images for one caption, where both agree).

Image->text: each image ranks the pool's distinct captions; a hit when its own caption is in the top k.
Text->image: each distinct caption ranks the pool's images; a hit when an image it describes is in the top k
(several images may share a caption: "a red circle").
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from instune.data.truncate import IGNORE_INDEX

PROMPT = "<image>\nDescribe the image."
RECALL_AT = (1, 5)


@dataclass
class RetrievalPool:
    images: list[bytes]  # PNG bytes
    captions: list[str]  # captions[i] describes images[i]


def score_matrix(model, processor, pool: RetrievalPool, batch_size: int = 64) -> tuple[np.ndarray, list[str]]:
    """(scores[image, caption], distinct captions): the mean log-likelihood of each caption given each image."""
    from instune.data.multimodal_tokenize import image_tokens, tokenize_multimodal
    from instune.train.multimodal_batches import MULTIMODAL_COLUMNS, collate_multimodal

    captions = sorted(set(pool.captions))
    image = image_tokens(processor)
    records = [{"messages": [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": caption}],
                "images": [png]} for png in pool.images for caption in captions]
    rows = tokenize_multimodal(records, processor, image, max_length=1 << 20)
    scores = []
    model.eval()
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            batch = collate_multimodal({k: [r[k] for r in chunk] for k in MULTIMODAL_COLUMNS})
            scores.append(mean_target_logprob(model, batch))
    return torch.cat(scores).numpy().reshape(len(pool.images), len(captions)), captions


def mean_target_logprob(model, batch: dict) -> torch.Tensor:
    """Per row, the mean log-probability of its labelled tokens."""
    device = next(model.parameters()).device
    logits = model(input_ids=batch["input_ids"].to(device), position_ids=batch["position_ids"].to(device),
                   pixel_values=batch["pixel_values"].to(device, next(model.parameters()).dtype)).logits
    targets = batch["labels"][:, 1:].to(device)
    logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    keep = targets != IGNORE_INDEX
    picked = logprobs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1) * keep
    return (picked.sum(dim=1) / keep.sum(dim=1).clamp(min=1)).cpu()


def recalls(scores: np.ndarray, image_captions: list[str], captions: list[str], ks=RECALL_AT) -> dict[str, float]:
    """{i2t_r1, i2t_r5, t2i_r1, t2i_r5} from a score matrix (images x distinct captions)."""
    truth = np.asarray([captions.index(c) for c in image_captions])
    # A rank counts the items scored above the true one and those tied with it: ties count against it, so a
    # model that scores everything alike retrieves nothing by luck.
    own = scores[np.arange(len(truth)), truth]
    i2t_rank = (scores > own[:, None]).sum(axis=1) + ((scores == own[:, None]).sum(axis=1) - 1)
    out = {f"i2t_r{k}": float(np.mean(i2t_rank < k)) for k in ks}
    for k in ks:
        hits = []
        for j in range(len(captions)):
            relevant = truth == j
            column = scores[:, j]
            best_relevant = column[relevant].max()
            # Rank of the best relevant image, ties counted against it.
            rank = (column > best_relevant).sum() + ((column == best_relevant) & ~relevant).sum()
            hits.append(rank < k)
        out[f"t2i_r{k}"] = float(np.mean(hits))
    return out


def retrieval_by_domain(model, processor, pools: dict[str, RetrievalPool], batch_size: int = 64
                        ) -> dict[str, dict[str, float]]:
    """{domain: recalls (+ pool size and distinct captions)} for each domain's pool."""
    results = {}
    for domain, pool in pools.items():
        scores, captions = score_matrix(model, processor, pool, batch_size)
        # Chance differs between pools (3 distinct captions make image->text recall@5 certain): report it, so
        # a gap between domains can be told from a gap between their pools.
        chance = {f"i2t_chance_r{k}": min(k, len(captions)) / len(captions) for k in RECALL_AT}
        results[domain] = {**recalls(scores, pool.captions, captions), **chance, "images": len(pool.images),
                           "captions": len(captions)}
    return results


def domain_gap(results: dict[str, dict[str, float]], in_domain: list[str], out_of_domain: list[str]
               ) -> dict[str, float]:
    """Per metric, the mean over in-domain domains minus the mean over out-of-domain ones."""
    metrics = [m for m in next(iter(results.values())) if m.startswith(("i2t_", "t2i_", "exact_match"))]
    gap = {}
    for metric in metrics:
        inside = [results[d][metric] for d in in_domain if d in results]
        outside = [results[d][metric] for d in out_of_domain if d in results]
        if inside and outside:
            gap[metric] = float(np.mean(inside) - np.mean(outside))
    return gap
