"""IMRAM training with mined negatives on 2 CPU processes (gloo + DDP) = one process on the global batch."""

import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from hf_pcme import IMRAMModel, PCMEModel
from hf_pcme.testing import tiny_pcme_config
from hf_pcme.training.mining_imram import MinedNegatives
from hf_pcme.training.module_imram import IMRAMTrainingModule

WORLD_SIZE = 2
IMAGE_IDS = torch.tensor([0, 1, 1, 2, 2, 3, 0, 4])  # positives across the two halves
CAPTION_IDS = torch.arange(100, 108)
LENGTHS = [2, 4, 3, 4, 6, 1, 5, 2]  # the halves pad to different lengths


def _global_batch():
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.zeros(8, max(LENGTHS), dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, length in enumerate(LENGTHS):
        input_ids[row, :length] = torch.randint(2, 64, (length,), generator=generator)
        attention_mask[row, :length] = 1
    return {"pixel_values": torch.randn(8, 3, 32, 32, generator=generator), "input_ids": input_ids,
            "attention_mask": attention_mask, "image_ids": IMAGE_IDS, "caption_ids": CAPTION_IDS}


def _build_module():
    torch.manual_seed(0)
    dual_encoder = PCMEModel(tiny_pcme_config()).eval()
    model = IMRAMModel.from_dual_encoder(dual_encoder, frozen_towers=["vision"], embed_dim=8, mined_negatives=2,
                                         mining_top_k=2, max_violation=True)  # K = M: the drawn sets are fixed
    batch = _global_batch()
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        regions = model.vision_model(pixel_values=batch["pixel_values"][:1]).last_hidden_state
    extra_ids = torch.randint(2, 64, (3, batch["input_ids"].shape[1]), generator=generator)
    negatives = MinedNegatives(
        image_ids=np.arange(6), image_rows=np.arange(6), caption_ids=np.arange(100, 111), caption_rows=np.arange(11),
        image_to_captions=torch.tensor([[8, 9], [10, 0], [0, 8], [9, 10], [1, 2], [3, 4]]),
        caption_to_images=torch.tensor([[5, 2], [0, 5], [4, 3], [5, 0], [1, 4], [0, 1], [2, 3], [0, 1], [1, 2], [3, 4], [5, 0]]),
        region_features=torch.randn(6, regions.shape[2] * regions.shape[3], regions.shape[1], generator=generator),
        input_ids=torch.cat([batch["input_ids"], extra_ids]),
        attention_mask=torch.cat([batch["attention_mask"], torch.ones_like(extra_ids)]),
    )
    return IMRAMTrainingModule(model, negatives=negatives).train()


def _loss_and_grads(module, batch):
    output = module(**batch)
    output.loss.backward()
    grads = {name.removeprefix("module."): p.grad.detach().clone() for name, p in module.named_parameters() if p.grad is not None}
    return output.loss.detach(), grads


def _worker(rank, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    torch.set_num_threads(1)
    try:
        batch = _global_batch()
        rows = slice(rank * 4, rank * 4 + 4)
        local = {key: value[rows] for key, value in batch.items()}
        width = int(local["attention_mask"].sum(1).max())
        local["input_ids"], local["attention_mask"] = local["input_ids"][:, :width], local["attention_mask"][:, :width]
        ddp = torch.nn.parallel.DistributedDataParallel(_build_module())
        torch.save(_loss_and_grads(ddp, local), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_two_processes_with_mined_negatives_match_one_process(tmp_path):
    single_loss, single_grads = _loss_and_grads(_build_module(), _global_batch())
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD_SIZE, join=True)
    results = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD_SIZE)]
    # each process: WORLD_SIZE x the loss of its own queries; together they are the global loss
    torch.testing.assert_close(sum(loss for loss, _ in results) / WORLD_SIZE, single_loss, rtol=1e-5, atol=1e-5)
    assert set(results[0][1]) == set(single_grads)
    for name, grad in single_grads.items():
        for _, grads in results:  # DDP averaged: every process holds the one-process gradient
            torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
