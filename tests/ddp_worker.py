"""Launched by `tests/test_ddp.py` under torchrun (2 CPU processes, gloo): the multi-process side.

`step`: one optimisation step of a DDP-wrapped `ContrastiveStep` on each rank's half of a fixed global batch;
rank 0 writes the resulting weights and loss. `train`: a short `pipeline.train.train` run.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from pipeline.distributed import init_distributed, shutdown, wrap_model
from pipeline.models.build import create_model
from pipeline.params import TrainParams
from pipeline.train import ContrastiveStep, train

STEP_MODEL = {"vocab_size": 30, "img_dim": 12, "embed_size": 16, "word_dim": 8}
STEP_BATCH = 8


def global_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A fixed batch with uneven caption and region lengths, so the ranks' halves pad differently."""
    generator = torch.Generator().manual_seed(11)
    region_lengths = torch.tensor([5, 3, 4, 2, 5, 5, 1, 4])
    caption_lengths = torch.tensor([3, 9, 4, 2, 7, 5, 6, 3])
    regions = torch.randn(STEP_BATCH, 5, STEP_MODEL["img_dim"], generator=generator)
    tokens = torch.randint(4, STEP_MODEL["vocab_size"], (STEP_BATCH, 9), generator=generator)
    for row in range(STEP_BATCH):
        regions[row, region_lengths[row] :] = 0
        tokens[row, caption_lengths[row] :] = 0
    return regions, region_lengths, tokens, caption_lengths


def one_step(context) -> tuple[dict[str, torch.Tensor], float]:
    """Gradients and weights after one step on the global batch (this rank's slice when distributed), loss.

    Plain SGD without clipping, so a wrongly scaled gradient (e.g. averaged instead of summed over ranks)
    shows in the weights; Adam and clipping would normalise it away.
    """
    torch.manual_seed(5)
    model = create_model("scan_t2i_lse", **STEP_MODEL)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    step = wrap_model(ContrastiveStep(model, margin=0.2, max_violation=True, context=context), context)
    regions, region_lengths, tokens, caption_lengths = global_batch()
    local = STEP_BATCH // context.world_size
    rows = slice(context.rank * local, (context.rank + 1) * local)
    regions, region_lengths = regions[rows], region_lengths[rows]
    tokens, caption_lengths = tokens[rows], caption_lengths[rows]
    # Trim to this slice's own longest item, as the collate function would.
    regions = regions[:, : int(region_lengths.max())]
    tokens = tokens[:, : int(caption_lengths.max())]
    loss = step(regions, region_lengths, tokens, caption_lengths)
    loss.backward()
    result = {f"grad.{name}": p.grad.detach().clone() for name, p in model.named_parameters()}
    optimizer.step()
    result.update({name: tensor.detach().clone() for name, tensor in model.state_dict().items()})
    return result, float(loss.detach())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--train-args", type=Path, help="JSON with train() arguments")
    args = parser.parse_args()
    torch.set_num_threads(1)
    context = init_distributed("cpu")
    try:
        weights, loss = one_step(context)
        if context.is_main:
            save_file(weights, str(args.out / "ddp_step.safetensors"))
            (args.out / "ddp_step.json").write_text(
                json.dumps({"loss": loss, "world_size": context.world_size})
            )
        if args.train_args is not None:
            spec = json.loads(args.train_args.read_text())
            train(TrainParams(**spec.pop("params")), progress=False, device="cpu", **spec)
    finally:
        shutdown(context)


if __name__ == "__main__":
    main()
