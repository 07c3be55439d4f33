"""Gathering with gradients: 2 CPU processes (gloo + DDP) give one process's loss and gradients on the global batch."""

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from hf_pcme import PCMEModel, ProbabilisticEmbedding
from hf_pcme.distributed import gather_embeddings, gather_tensor
from hf_pcme.testing import tiny_pcme_config
from hf_pcme.training.module import ContrastiveTrainingModule, positive_mask_from_ids

REPO = Path(__file__).resolve().parents[1]
WORLD_SIZE = 2
GLOBAL_BATCH = 8
# Image ids with repeats inside and across the two halves: positives span processes.
IMAGE_IDS = torch.tensor([0, 1, 1, 2, 2, 3, 0, 4])
# Caption lengths: the two halves pad to different lengths (4 and 6), so gathered attention maps
# over caption words must be padded to a common length.
LENGTHS = [2, 4, 3, 4, 6, 1, 5, 2]

SCENARIOS = {
    "pcme++": {"head_type": "probabilistic", "loss_type": "pcme++", "match_function": "csd"},
    "pvse": {"head_type": "polysemous", "loss_type": "pvse", "num_embeds": 2},
    "infonce": {"head_type": "deterministic", "loss_type": "infonce"},
}


def _global_batch():
    generator = torch.Generator().manual_seed(1)
    pixel_values = torch.randn(GLOBAL_BATCH, 3, 32, 32, generator=generator)
    input_ids = torch.zeros(GLOBAL_BATCH, max(LENGTHS), dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, length in enumerate(LENGTHS):
        input_ids[row, :length] = torch.randint(2, 64, (length,), generator=generator)
        attention_mask[row, :length] = 1
    return {"pixel_values": pixel_values, "input_ids": input_ids, "attention_mask": attention_mask, "image_ids": IMAGE_IDS}


def _local_batch(batch, rank):
    per_rank = GLOBAL_BATCH // WORLD_SIZE
    rows = slice(rank * per_rank, (rank + 1) * per_rank)
    local = {key: value[rows] for key, value in batch.items()}
    width = int(local["attention_mask"].sum(1).max())  # each process pads to its own longest caption
    local["input_ids"] = local["input_ids"][:, :width]
    local["attention_mask"] = local["attention_mask"][:, :width]
    return local


def _build_module(scenario):
    torch.manual_seed(0)
    model = PCMEModel(tiny_pcme_config(**SCENARIOS[scenario]))
    module = ContrastiveTrainingModule(model)
    module.eval()  # BatchNorm on batch statistics would differ between half and full batches
    return module


def _loss_and_grads(module, batch):
    output = module(**batch)
    output.loss.backward()
    grads = {
        name.removeprefix("module."): p.grad.detach().clone() for name, p in module.named_parameters() if p.grad is not None
    }
    return output.loss.detach(), grads


def _trainer_recipe(output_dir, cache_dir):
    """A tiny full recipe whose training is batch-composition independent: a ViT tower (LayerNorm, no
    BatchNorm), the bi-GRU, and the PCME++ loss (no Monte-Carlo samples in the loss)."""
    from hf_pcme.training.config import load_recipe

    return load_recipe(
        REPO / "configs" / "shapes_pcme.yaml",
        [
            "model.vision_config={model_type: vit, image_size: 32, patch_size: 8, hidden_size: 16, num_hidden_layers: 1, "
            "num_attention_heads: 2, intermediate_size: 32}",
            "model.text_config={model_type: pcme_bigru, word_dim: 8, hidden_size: 16}",
            "model.embed_dim=8", "model.loss_type=pcme++", "model.match_function=csd",
            "model.loss_kwargs={vib_beta: 1.0e-4}",
            f"data.options={{num_images: 8, num_eval_images: 4, image_size: 32, cache_dir: {cache_dir}}}",
            "data.image_size=32", "train.batch_size=8", "train.phase1_steps=1", "train.phase2_steps=2",
            "train.phase1_frozen=[vision]", "train.warmup_steps=0", "train.eval_every=3", "eval.max_images=4",
            f"output_dir={output_dir}",
        ],
    )


def _worker(rank, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    torch.set_num_threads(1)
    results = {}
    try:
        # Uneven sizes and trailing padding: y = concat(x_r); every process's loss sum(y * w)
        # sends w back, so the local gradient is the sum over processes: WORLD_SIZE * w[slice].
        sizes, widths = [2, 3], [4, 2]
        start = sum(sizes[:rank])
        full = torch.arange(5 * 4, dtype=torch.float).reshape(5, 4)
        x = full[start : start + sizes[rank], : widths[rank]].clone().requires_grad_()
        y = gather_tensor(x)
        weights = torch.arange(y.numel(), dtype=torch.float).reshape(y.shape)
        (y * weights).sum().backward()
        results["gathered"] = y.detach()
        results["grad_x"] = x.grad
        results["expected_grad_x"] = WORLD_SIZE * weights[start : start + sizes[rank], : widths[rank]]
        results["int_ids"] = gather_tensor(torch.tensor([rank, 10 + rank]))

        batch = _global_batch()
        for scenario in SCENARIOS:
            module = _build_module(scenario)
            ddp = torch.nn.parallel.DistributedDataParallel(module)
            results[scenario] = _loss_and_grads(ddp, _local_batch(batch, rank))

        # The whole Trainer, launched the way accelerate launch does (environment variables).
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD_SIZE), TQDM_DISABLE="1")
        from accelerate import PartialState

        from hf_pcme.training.trainer import train

        result = train(_trainer_recipe(os.path.join(out_dir, "trainer"), os.path.join(out_dir, "cache")))
        results["trainer"] = {
            "processes": PartialState().num_processes,  # accelerate really ran 2 processes
            "weights": {k: v.detach().clone() for k, v in result.model.state_dict().items()},
            "metrics": result.metrics,
        }
    finally:
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models on a shared machine: extra threads only contend
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def one_process_training(tmp_path_factory):
    from hf_pcme.training.trainer import train

    out_dir = tmp_path_factory.mktemp("ddp")
    return out_dir, train(_trainer_recipe(out_dir / "single", out_dir / "cache"))  # also builds the data cache


@pytest.fixture(scope="module")
def two_process_results(one_process_training):
    out_dir = one_process_training[0]
    mp.spawn(_worker, args=(_free_port(), str(out_dir)), nprocs=WORLD_SIZE, join=True)
    return [torch.load(out_dir / f"rank{rank}.pt") for rank in range(WORLD_SIZE)]


def test_gather_is_the_identity_without_a_process_group():
    x = torch.randn(3, 2, requires_grad=True)
    assert gather_tensor(x) is x
    embedding = ProbabilisticEmbedding(mean=x, log_sigma2=None)
    assert gather_embeddings(embedding) is embedding
    assert gather_tensor(None) is None


def test_gather_pads_trailing_dims_and_sums_gradients(two_process_results):
    # rank 0 sent rows 0-1 at width 4, rank 1 rows 2-4 at width 2: zero-padded to width 4.
    want = torch.arange(20, dtype=torch.float).reshape(5, 4)
    want[2:, 2:] = 0
    for results in two_process_results:
        assert torch.equal(results["gathered"], want)
        assert torch.equal(results["grad_x"], results["expected_grad_x"])
        assert results["int_ids"].tolist() == [0, 10, 1, 11]


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_two_processes_match_one_process_on_the_global_batch(two_process_results, scenario):
    single_loss, single_grads = _loss_and_grads(_build_module(scenario), _global_batch())
    for rank, results in enumerate(two_process_results):
        loss, grads = results[scenario]
        torch.testing.assert_close(loss, single_loss, rtol=1e-5, atol=1e-6, msg=f"{scenario}: loss on rank {rank}")
        assert grads.keys() == single_grads.keys()
        for name, grad in grads.items():
            # DDP averages the per-process gradients; with gathering-with-gradients that average
            # is exactly the single-process gradient (see hf_pcme.distributed).
            torch.testing.assert_close(grad, single_grads[name], rtol=1e-4, atol=1e-6, msg=f"{scenario}: {name}")


def test_two_process_trainer_trains_like_one_process(two_process_results, one_process_training):
    """End to end: accelerate with 2 gloo processes (each half of every global batch) = 1 process."""
    single = one_process_training[1]
    expected = {k: v.detach() for k, v in single.model.state_dict().items()}
    for results in two_process_results:
        trained = results["trainer"]
        assert trained["processes"] == WORLD_SIZE
        assert trained["weights"].keys() == expected.keys()
        for name, value in trained["weights"].items():
            torch.testing.assert_close(value, expected[name], rtol=1e-4, atol=1e-5, msg=name)
        assert trained["metrics"].keys() == single.metrics.keys()
        assert trained["metrics"]["rsum"] == pytest.approx(single.metrics["rsum"])


def test_cross_process_positives_change_the_loss():
    # The positive mask comes from the image ids of the *global* batch (captions 0 and 6 share image 0).
    mask = positive_mask_from_ids(IMAGE_IDS)
    assert mask[0, 6] and mask[6, 0] and mask[1, 2] and not mask[0, 1]
    assert int(mask.sum()) == GLOBAL_BATCH + 6
