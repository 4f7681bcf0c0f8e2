"""Quick start: train a tiny Transfusion on random text + two kinds of modalities, then sample.

    python examples/quickstart_transfusion.py
"""

import torch
from torch import randint, randn
from tqdm.auto import trange

from mmgen_pytorch import Transfusion, print_modality_sample


def main(steps: int = 20):
    torch.manual_seed(0)
    model = Transfusion(num_text_tokens=256, dim_latent=(16, 8), modality_default_shape=((4, 4), (6,)),
                        transformer=dict(dim=128, depth=2, heads=4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)
    batch = [
        [randint(0, 256, (12,)), randn(4, 4, 16), randint(0, 256, (5,)), (1, randn(6, 8))],
        [randint(0, 256, (7,)), (1, randn(3, 8)), randint(0, 256, (9,))],
    ]
    for _ in trange(steps, desc="training"):
        loss, breakdown = model(batch, return_breakdown=True)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    print(f"loss {loss.item():.3f} (text {breakdown.text.item():.3f}, flows {[round(f.item(), 3) for f in breakdown.flow]})")
    sample = model.sample([randint(0, 256, (4,))], max_length=64, force_modality_at_start=0, modality_steps=8)
    print_modality_sample(sample)


if __name__ == "__main__":
    main()
