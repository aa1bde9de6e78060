"""What one training step moves and holds, per model preset: the numbers behind the README's
"Plan past this machine" (issue 19). Counted, not timed, so it runs anywhere in seconds.

For each preset (built from its config, as ``vae-train`` builds it, on Fashion-MNIST's shape):

* ``parameters`` and ``gradient_bytes``: what DDP all-reduces every step (float32 gradients;
  bf16-mixed keeps float32 master weights and gradients, so the same);
* ``vq_statistics_floats``: what the EMA quantizer all-reduces besides (K x D + K);
* ``saved_activation_bytes_per_example``: the tensors autograd keeps for the backward pass of
  one training step, counted by ``torch.autograd.graph.saved_tensors_hooks`` on a batch of 128
  in float32, divided by 128 (bf16-mixed roughly halves the matmul inputs among them);
* ``state_bytes``: weights + gradients + Adam's two moments, 16 bytes a parameter;
* ``h200_batch_bound``: (141 GB x 0.8 - state) / activation bytes per example, an upper bound
  on the examples one H200 can hold in one step at that size (the 20% left for the allocator's
  fragmentation, the CUDA context and the evaluation buffers).

    python benchmarks/scale_plan.py            # writes benchmarks/results/scale_plan.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from experiments.train import CONFIG_DIR  # noqa: E402

PRESETS = {
    "vae_fashion (MLP 784-512-16)": ["experiment=vae_fashion"],
    "conv VAE, 8-bit, logistic mixture (vae_fashion_8bit)": ["experiment=vae_fashion_8bit"],
    "vqvae_fashion (conv, K=512, D=64)": ["experiment=vqvae_fashion"],
}
BATCH = 128
H200_BYTES = 141e9


class ShapeOnlyData:
    """What ``build_model`` reads from a DataModule, without reading the data."""

    def __init__(self, levels: int):
        self.image_shape, self.num_levels, self.name = (1, 28, 28), levels, "fashion_mnist"


def saved_bytes(model: torch.nn.Module, x: torch.Tensor) -> int:
    total = 0

    def pack(tensor):
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = model.compute_terms(x, step=0)
    loss.backward()
    return total


def main() -> None:
    from experiments.train import build_model

    results = {}
    for name, overrides in PRESETS.items():
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            cfg = compose("config", overrides=overrides)
        levels = 2 if cfg.data.binarize != "none" else 256
        torch.manual_seed(0)
        model = build_model(cfg.model, ShapeOnlyData(levels)).train()
        x = torch.randint(0, levels, (BATCH, 1, 28, 28)).float() / (levels - 1)
        parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
        quantizer = getattr(model, "quantizer", None)
        vq = None
        if quantizer is not None and hasattr(quantizer, "codebook"):
            k, d = quantizer.codebook.shape
            vq = k * d + k
        per_example = saved_bytes(model, x) / BATCH
        state = 16 * parameters
        results[name] = {
            "parameters": parameters,
            "gradient_bytes": 4 * parameters,
            "vq_statistics_floats": vq,
            "saved_activation_bytes_per_example": round(per_example),
            "state_bytes": state,
            "h200_batch_bound": int((0.8 * H200_BYTES - state) / per_example),
        }
        print(name, results[name], flush=True)
    out = ROOT / "benchmarks" / "results" / "scale_plan.json"
    out.write_text(json.dumps({"batch": BATCH, "models": results}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
