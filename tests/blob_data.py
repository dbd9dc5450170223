"""Small synthetic datasets for the training tests: label blobs on a textured background."""

import torch

from tutorial_utils.data import Dataset


def blob_dataset(num_labels=3, size=(48, 64), n=6, seed=0, shift=0, parts=6) -> Dataset:
    """Blobs of labels 1..L-1 (radius ``H / parts``) at random places on a textured background;
    slice i moved down by ``shift * i`` pixels. The last two slices are the test slices."""
    generator = torch.Generator().manual_seed(seed)
    H, W = size
    yy, xx = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    images, labels = [], []
    for i in range(n):
        lab = torch.zeros(H, W, dtype=torch.long)
        img = 0.2 + 0.05 * torch.rand(H, W, generator=generator)
        for label in range(1, num_labels):
            cy = H * (0.3 + 0.4 * torch.rand((), generator=generator)) + shift * i
            cx = W * label / num_labels + 3 * torch.randn((), generator=generator)
            blob = (yy - cy) ** 2 + (xx - cx) ** 2 < (H / parts) ** 2
            lab[blob] = label
            img[blob] = 0.3 + 0.5 * label / num_labels
        images.append(img.clamp(0, 1))
        labels.append(lab)
    return Dataset.from_arrays(torch.stack(images), torch.stack(labels),
                               ["background"] + [f"organ {k}" for k in range(1, num_labels)],
                               train_ids=list(range(n - 2)), test_ids=[n - 2, n - 1])
