"""Evaluating frozen self-supervised features: DINO's weighted k-NN classifier and a linear probe.

The k-NN monitor is the one of Caron et al. 2021 (§4.1 "Evaluation protocols", after Wu et al. 2018): features
are ℓ2-normalised, each test image's k = 20 nearest training images by cosine similarity s_i vote for their class
with weight exp(s_i / T), T = 0.07, and the class with the largest summed weight is the prediction.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

__all__ = ["extract_features", "knn_predict", "knn_accuracy", "train_linear_probe"]


@torch.no_grad()
def extract_features(model: nn.Module, loader: DataLoader, device: torch.device) -> tuple[Tensor, Tensor]:
    """Pooled backbone features (N, D) (``model`` built with ``num_classes=0``) and labels (N,), in eval mode."""
    was_training = model.training
    model.eval()
    feats, labels = [], []
    for images, targets in loader:
        feats.append(model(images.to(device)).float().cpu())
        labels.append(targets)
    model.train(was_training)
    return torch.cat(feats), torch.cat(labels)


@torch.no_grad()
def knn_predict(train_features: Tensor, train_labels: Tensor, test_features: Tensor, num_classes: int,
                k: int = 20, temperature: float = 0.07, chunk: int = 256) -> Tensor:
    """Class scores (N_test, num_classes) of DINO's weighted k-NN vote (Caron et al. 2021, §4.1): cosine
    similarity of ℓ2-normalised features, the ``k`` most similar training images, weights exp(s / T)."""
    if k < 1 or temperature <= 0:
        raise ValueError(f"k-NN needs k >= 1 and a positive temperature, got k={k}, T={temperature}")
    if train_features.shape[0] != train_labels.shape[0] or train_features.shape[0] == 0:
        raise ValueError(f"k-NN needs one label per training feature and at least one, got "
                         f"{train_features.shape[0]} features and {train_labels.shape[0]} labels")
    if train_features.shape[1] != test_features.shape[1]:
        raise ValueError(f"train features have {train_features.shape[1]} dimensions, test {test_features.shape[1]}")
    k = min(k, train_features.shape[0])
    train = F.normalize(train_features.float(), dim=1)
    scores = []
    for start in range(0, test_features.shape[0], chunk):
        test = F.normalize(test_features[start:start + chunk].float(), dim=1)
        sim, idx = (test @ train.T).topk(k, dim=1)
        votes = torch.zeros(test.shape[0], num_classes)
        votes.scatter_add_(1, train_labels[idx].long(), (sim / temperature).exp())
        scores.append(votes)
    return torch.cat(scores) if scores else torch.zeros(0, num_classes)


def knn_accuracy(train_features: Tensor, train_labels: Tensor, test_features: Tensor, test_labels: Tensor,
                 num_classes: int, k: int = 20, temperature: float = 0.07) -> dict[str, float]:
    """Top-1 and top-5 accuracy (%) of :func:`knn_predict`."""
    scores = knn_predict(train_features, train_labels, test_features, num_classes, k, temperature)
    top = scores.topk(min(5, num_classes), dim=1).indices
    hits = top == test_labels.view(-1, 1)
    n = max(len(test_labels), 1)
    return dict(top1=100.0 * hits[:, 0].sum().item() / n, top5=100.0 * hits.any(1).sum().item() / n)


def train_linear_probe(train_features: Tensor, train_labels: Tensor, val_features: Tensor, val_labels: Tensor,
                       num_classes: int, epochs: int = 100, lr: float = 1e-3, batch_size: int = 256,
                       seed: int = 0, weight_decay: float = 0.0) -> tuple[nn.Linear, list[dict[str, float]]]:
    """Linear evaluation on frozen features (Caron et al. 2021, §4.1 "Linear and k-NN classification"): one linear
    layer on the pooled backbone features, trained with cross-entropy. Returns the layer and per-epoch
    (train loss, val top-1)."""
    # paper-silent at CPU scale: features are extracted once without augmentation and the layer is trained with
    # AdamW on them (DINO trains with SGD on augmented crops for 100 epochs); features are ℓ2-normalised as in k-NN
    gen = torch.Generator().manual_seed(seed)
    x_train, x_val = F.normalize(train_features.float(), dim=1), F.normalize(val_features.float(), dim=1)
    layer = nn.Linear(x_train.shape[1], num_classes)
    with torch.no_grad():
        layer.weight.normal_(0, 0.01, generator=gen)
        layer.bias.zero_()
    opt = torch.optim.AdamW(layer.parameters(), lr=lr, weight_decay=weight_decay)
    history = []
    for epoch in range(epochs):
        order = torch.randperm(len(x_train), generator=gen)
        total = 0.0
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            loss = F.cross_entropy(layer(x_train[idx]), train_labels[idx].long())
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        with torch.no_grad():
            top1 = 100.0 * (layer(x_val).argmax(1) == val_labels).float().mean().item()
        history.append(dict(epoch=epoch + 1, train_loss=total / len(x_train), val_top1=top1))
    return layer, history
