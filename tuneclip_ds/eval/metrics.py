"""Counting correct answers: top-k classification and recall@k retrieval, from similarity scores."""

from __future__ import annotations

import torch

TOP_K = (1, 5)
RECALL_AT = (1, 5, 10)


def hits_at_k(scores: torch.Tensor, correct: torch.Tensor, ks: tuple[int, ...]) -> torch.Tensor:
    """For each k, how many queries (rows) have a correct candidate among their k best-scoring ones.

    A query's rank is the position of its first correct candidate when its candidates are sorted by
    descending score, equal scores in candidate order (a stable sort): the convention of open_clip's
    ``get_clip_metrics`` and CLIP_benchmark. A wrong candidate that ties with the best correct one
    and comes before it counts against the query (identical captions give identical scores).
    """
    best_correct = scores.masked_fill(~correct, float("-inf")).amax(dim=1, keepdim=True)
    candidates = torch.arange(scores.shape[1], device=scores.device)
    first_best = torch.where(correct & (scores == best_correct), candidates, scores.shape[1]).amin(dim=1, keepdim=True)
    ahead = (scores > best_correct) | ((scores == best_correct) & (candidates < first_best))
    ranks = ahead.sum(dim=1)
    return torch.stack([(ranks < k).sum() for k in ks])


def retrieval_hits(images: torch.Tensor, texts: torch.Tensor, text_image: torch.Tensor, chunk: int,
                   rank: int, world_size: int) -> torch.Tensor:
    """This rank's share of ``[image->text hits at RECALL_AT..., text->image hits at RECALL_AT...]``.

    ``images``: all image embeddings, row i = image i; ``texts``: all caption embeddings;
    ``text_image[j]``: the image of caption j. Queries go in global chunks of ``chunk`` rows,
    chunk c on rank ``c % world_size``: every chunk has the same shape whatever the world size,
    so the scores, and the sum of the counts over ranks, are those of one process.
    """
    image_ids = torch.arange(len(images), device=images.device)
    image_to_text = torch.zeros(len(RECALL_AT), dtype=torch.int64, device=images.device)
    for start in range(rank * chunk, len(images), world_size * chunk):
        queries = slice(start, start + chunk)
        correct = image_ids[queries, None] == text_image[None, :]
        image_to_text += hits_at_k(images[queries] @ texts.T, correct, RECALL_AT)
    text_to_image = torch.zeros_like(image_to_text)
    for start in range(rank * chunk, len(texts), world_size * chunk):
        queries = slice(start, start + chunk)
        correct = text_image[queries, None] == image_ids[None, :]
        text_to_image += hits_at_k(texts[queries] @ images.T, correct, RECALL_AT)
    return torch.cat([image_to_text, text_to_image])
