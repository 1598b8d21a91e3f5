"""Optional periodic validation during training: pixel accuracy and mIoU of the training
vocabulary on the first few images of a held-out split (SED's protocol in small: the model sees
the image resized to the crop size, logits are upsampled to the label's size). A quick learning
signal, not the evaluation stage (`dpseg eval`)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from dpseg.data.readers import SegmentationDataset
from dpseg.data.subsets import remap_labels
from dpseg.data.transforms import EvalTransform


class Validator:
    def __init__(self, dataset: SegmentationDataset, keep: list[int], size: int, images: int):
        self.dataset, self.keep, self.size = dataset, keep, size
        self.indices = list(range(min(images, len(dataset))))
        self.transform = EvalTransform(size)

    @torch.no_grad()
    def __call__(self, model, text, visual, device) -> dict:
        was_training = model.training
        model.eval()
        n, ignore = len(self.keep), self.dataset.ignore_index
        conf = torch.zeros(n * n, dtype=torch.int64)
        for index in self.indices:
            image, label = self.dataset.load(index)
            sample = self.transform(image, label)
            pixels = sample["image"].unsqueeze(0).to(device).float().div_(255)
            logits = model(model.image_encoder.normalize(pixels), text=text, visual=visual)
            logits = F.interpolate(logits.float(), size=label.shape, mode="bilinear", align_corners=False)
            pred = logits.argmax(1)[0].cpu().reshape(-1)
            truth = torch.from_numpy(remap_labels(label, self.keep, self.dataset.num_classes, ignore)).reshape(-1)
            valid = truth != ignore
            conf += torch.bincount(truth[valid] * n + pred[valid], minlength=n * n)
        model.train(was_training)
        return scores(conf.view(n, n).numpy())


def scores(conf: np.ndarray) -> dict:
    """pAcc and mIoU (over classes with ground truth) from a confusion matrix (rows = truth)."""
    tp = np.diag(conf).astype(np.float64)
    gt, pred = conf.sum(1), conf.sum(0)
    present = gt > 0
    iou = tp[present] / (gt + pred - tp)[present]
    return {
        "val_pacc": float(tp.sum() / max(conf.sum(), 1)),
        "val_miou": float(iou.mean()) if present.any() else 0.0,
        "val_classes": int(present.sum()),
    }
