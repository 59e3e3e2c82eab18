"""DINO's weighted k-nearest-neighbour classifier on L2-normalised features."""
import torch


@torch.no_grad()
def knn_classify(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                 test_labels: torch.Tensor, ks: list[int], temperature: float = 0.07, num_classes: int | None = None,
                 chunk_size: int = 1024) -> dict[int, tuple[float, float]]:
    """Top-1 / top-5 accuracy (%) for every k in one pass: the k most cosine-similar training
    features vote for their label with weight exp(similarity / T). Classes that got no vote
    never count as a top-5 hit (their order among themselves would be arbitrary)."""
    num_classes = num_classes or int(max(train_labels.max(), test_labels.max())) + 1
    train_features = torch.nn.functional.normalize(train_features.float(), dim=1)
    test_features = torch.nn.functional.normalize(test_features.float(), dim=1)
    max_k = min(max(ks), train_features.shape[0])
    hits = {k: torch.zeros(2, dtype=torch.long) for k in ks}
    for start in range(0, test_features.shape[0], chunk_size):
        feats = test_features[start:start + chunk_size]
        labels = test_labels[start:start + chunk_size].to(feats.device)
        sims, idx = (feats @ train_features.T).topk(max_k, dim=1)            # sorted, most similar first
        votes = torch.nn.functional.one_hot(train_labels.to(feats.device)[idx], num_classes).float()
        votes = votes * (sims / temperature).exp().unsqueeze(-1)          # (B, max_k, C)
        cumulative = votes.cumsum(dim=1)
        for k in ks:
            scores = cumulative[:, min(k, max_k) - 1]
            top_scores, top = scores.topk(min(5, num_classes), dim=1)
            correct = (top == labels.unsqueeze(1)) & (top_scores > 0)     # a class without votes is no guess
            hits[k] += torch.stack([correct[:, 0].sum(), correct.any(dim=1).sum()]).cpu()
    n = test_features.shape[0]
    return {k: (100.0 * h[0].item() / n, 100.0 * h[1].item() / n) for k, h in hits.items()}
