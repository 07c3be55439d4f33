"""Recipes: YAML loading, dotted overrides, and errors that name the bad key before any training."""

from pathlib import Path

import pytest

from hf_pcme.training.config import Recipe, load_recipe, parse_override, recipe_from_dict

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
MINIMAL = ["model.vision_config={model_type: resnet}"]


def test_all_shipped_recipes_exist_and_load():
    names = {path.stem for path in CONFIGS}
    assert {"coco_pcme", "cub_pcme", "coco_pvse", "coco_vsepp", "coco_pcmepp", "shapes_pcme", "shapes_deterministic"} <= names
    for path in CONFIGS:
        recipe = load_recipe(path)
        assert recipe.name == path.stem, f"{path.name}: name should match the file name"


def test_coco_recipe_has_the_original_hyper_parameters():
    # docs/formulas.md (PCME training recipe) / naver-ai/pcme config/coco/pcme_coco.yaml.
    recipe = load_recipe(REPO / "configs" / "coco_pcme.yaml")
    model, train = recipe.model, recipe.train
    assert model.vision_tower == "microsoft/resnet-152"
    assert (model.embed_dim, model.num_samples) == (1024, 7)
    assert (model.init_negative_scale, model.init_shift) == (15.0, 15.0)
    assert model.loss_type == "pcme" and model.loss_kwargs == {"vib_beta": 1e-5}
    assert (train.lr, train.batch_size, train.phase1_epochs, train.phase2_epochs) == (2e-4, 128, 30, 30)
    assert train.phase2_lr_multiplier == 0.1 and train.grad_clip == 2.0
    assert train.diagonal_positives_only is True


def test_cub_recipe_has_the_original_hyper_parameters():
    recipe = load_recipe(REPO / "configs" / "cub_pcme.yaml")
    model, train = recipe.model, recipe.train
    assert model.vision_tower == "microsoft/resnet-50"
    assert (model.embed_dim, model.init_negative_scale, model.init_shift) == (512, 5.0, 5.0)
    assert model.loss_kwargs == {"vib_beta": 1e-3, "uniformity_weight": 10.0}
    assert (train.lr, train.phase1_epochs, train.phase2_epochs) == (1e-4, 10, 50)
    assert recipe.data.sampler == "class_balanced"


def test_shipped_recipes_build_their_model_config_and_loss():
    # Everything but the (downloaded) towers: catches typos in loss_kwargs or head settings.
    from hf_pcme import PCMEConfig, PCMEModel
    from hf_pcme.testing import tiny_text_config, tiny_vision_config
    from hf_pcme.training.builders import pcme_config_kwargs

    for path in CONFIGS:
        kwargs = pcme_config_kwargs(load_recipe(path).model)
        kwargs["embed_dim"] = 8
        if kwargs["loss_type"] == "center":
            kwargs["loss_kwargs"] = {**kwargs["loss_kwargs"], "num_classes": 3}
        config = PCMEConfig(vision_config=tiny_vision_config(), text_config=tiny_text_config(), **kwargs)
        assert PCMEModel(config).criterion is not None, path.name


def test_overrides_are_parsed_as_yaml_scalars():
    recipe = load_recipe(
        None,
        MINIMAL
        + [
            "train.max_steps=20",
            "train.lr=1e-3",  # PyYAML alone reads this as a string
            "train.load_best_at_end=true",
            "train.grad_clip=null",
            "train.phase1_frozen=[vision, text]",
            "output_dir=runs/x",
            "model.loss_kwargs.vib_beta=1e-5",
            "train.mixed_precision=no",  # YAML 1.1 reads a bare no as false
        ],
    )
    assert recipe.train.max_steps == 20 and isinstance(recipe.train.max_steps, int)
    assert recipe.train.lr == 0.001 and isinstance(recipe.train.lr, float)
    assert recipe.train.load_best_at_end is True
    assert recipe.train.grad_clip is None
    assert recipe.train.phase1_frozen == ["vision", "text"]
    assert recipe.output_dir == "runs/x"
    assert recipe.model.loss_kwargs == {"vib_beta": 1e-5}
    assert recipe.train.mixed_precision == "no"


def test_scientific_notation_in_files_is_a_float(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model:\n  vision_config: {model_type: resnet}\n  loss_kwargs: {vib_beta: 1e-5}\ntrain:\n  lr: 2e-4\n")
    recipe = load_recipe(path)
    assert recipe.train.lr == 2e-4
    assert recipe.model.loss_kwargs["vib_beta"] == 1e-5


def test_override_wins_over_file_and_int_becomes_float(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model:\n  vision_config: {model_type: resnet}\ntrain:\n  lr: 2.0e-4\n  batch_size: 64\n")
    recipe = load_recipe(path, ["train.lr=1", "train.batch_size=8"])
    assert recipe.train.lr == 1.0 and isinstance(recipe.train.lr, float)
    assert recipe.train.batch_size == 8


def test_unknown_key_names_the_key_and_lists_valid_keys(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model:\n  vision_config: {model_type: resnet}\ntrain:\n  learning_rate: 0.1\n")
    with pytest.raises(ValueError) as error:
        load_recipe(path)
    message = str(error.value)
    assert "'train.learning_rate'" in message
    assert "batch_size" in message and "max_steps" in message  # the valid keys are listed


def test_unknown_override_suggests_the_close_key():
    with pytest.raises(ValueError, match=r"'train\.max_step'.*Did you mean 'train\.max_steps'"):
        load_recipe(None, MINIMAL + ["train.max_step=3"])
    with pytest.raises(ValueError, match=r"Unknown recipe key 'bogus'.*top level"):
        load_recipe(None, MINIMAL + ["bogus=1"])


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.batch_size=2.5", "train.batch_size"),
        ("train.batch_size=true", "train.batch_size"),
        ("train.lr=fast", "train.lr"),
        ("train.mixed_precision=fp32", "train.mixed_precision"),
        ("model.head_type=gaussian", "model.head_type"),
        ("train.phase1_frozen=[vision, audio]", "train.phase1_frozen[1]"),
        ("train=3", "train"),
        ("data.options=5", "data.options"),
        ("seed=abc", "seed"),
    ],
)
def test_wrong_type_names_the_key(override, key):
    with pytest.raises(ValueError) as error:
        load_recipe(None, MINIMAL + [override])
    assert f"'{key}'" in str(error.value)


def test_out_of_range_values_are_rejected():
    with pytest.raises(ValueError, match="'train.batch_size' must be >= 1"):
        load_recipe(None, MINIMAL + ["train.batch_size=0"])
    with pytest.raises(ValueError, match="'train.max_steps' must be >= 0"):
        load_recipe(None, MINIMAL + ["train.max_steps=-1"])
    with pytest.raises(ValueError, match="image tower"):
        load_recipe(None, [])


def test_malformed_override_and_missing_file_are_clear(tmp_path):
    with pytest.raises(ValueError, match="section.key=value"):
        parse_override("train.max_steps")
    with pytest.raises(ValueError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")


def test_recipe_round_trips_through_yaml():
    recipe = load_recipe(REPO / "configs" / "cub_pcme.yaml", ["train.max_steps=7"])
    from hf_pcme.training.config import parse_yaml

    again = recipe_from_dict(parse_yaml(recipe.to_yaml()))
    assert again == recipe
    assert isinstance(again, Recipe)


def test_train_script_rejects_a_bad_recipe_before_creating_anything(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_script", REPO / "scripts" / "train.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    output_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        script.main(["--config", str(REPO / "configs" / "shapes_pcme.yaml"), f"output_dir={output_dir}", "train.lrr=1"])
    assert exit_info.value.code == 2
    assert not output_dir.exists()


def test_model_card_carries_results_recipe_and_limits(tmp_path):
    import yaml

    from hf_pcme.training.model_card import write_model_card

    recipe = load_recipe(REPO / "configs" / "coco_pcme.yaml")
    metrics = {"i2t_R@1": 68.8, "t2i_R@1": 54.6, "i2t_pmrp": 45.0, "t2i_pmrp": 46.0, "rsum": 400.5}
    path = write_model_card(tmp_path, recipe, metrics, repo_id="user/pcme-coco", dataset_split="test")
    text = path.read_text()
    front = yaml.safe_load(text.split("---")[1])
    (entry,) = front["model-index"]
    assert entry["name"] == "pcme-coco"
    (result,) = entry["results"]
    assert result["task"]["type"] == "cross-modal-retrieval"
    assert result["dataset"] == {"name": "MS-COCO (Karpathy split)", "type": "coco", "split": "test"}
    assert {m["type"]: m["value"] for m in result["metrics"]} == metrics
    assert "microsoft/resnet-152" in front["base_model"]
    # Body: a results table row per metric name, the full recipe, intended use and limitations.
    assert "| R@1 | 68.80 | 54.60 |  |" in text and "| PMRP | 45.00 | 46.00 |  |" in text
    assert "vision_tower: microsoft/resnet-152" in text
    assert "## Intended use" in text and "not a calibrated probability" in text


# ------------------------------------------------------------------------------- optimiser and phases
def _tiny_model(**overrides):
    from hf_pcme import PCMEModel
    from hf_pcme.testing import tiny_pcme_config

    return PCMEModel(tiny_pcme_config(**overrides))


def test_warmup_cosine_schedule_follows_the_formula():
    import math

    import torch

    from hf_pcme.training.optim import build_scheduler

    lr, total, warmup, floor = 0.1, 10, 2, 0.2
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    scheduler = build_scheduler(optimizer, total, warmup, floor)
    seen = []
    for _ in range(total):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    expected = [
        lr * t / warmup if t < warmup
        else lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * (t - warmup) / (total - warmup))))
        for t in range(total)
    ]
    assert seen == pytest.approx(expected)


def test_parameter_groups_skip_decay_for_biases_and_scalars_and_scale_tower_lr():
    from hf_pcme.training.optim import parameter_groups

    model = _tiny_model()
    groups = parameter_groups(model, lr=1.0, weight_decay=0.5, tower_lr_multiplier=0.1)
    by_param = {id(p): g for g in groups for p in g["params"]}
    names = dict(model.named_parameters())
    assert by_param[id(names["negative_scale"])]["weight_decay"] == 0.0
    assert by_param[id(names["image_head.mean_branch.global_proj.bias"])]["weight_decay"] == 0.0
    head_weight = by_param[id(names["image_head.mean_branch.global_proj.weight"])]
    assert (head_weight["lr"], head_weight["weight_decay"]) == (1.0, 0.5)
    tower = [n for n in names if n.startswith("text_model.") and n.endswith("weight_ih_l0")][0]
    assert by_param[id(names[tower])]["lr"] == pytest.approx(0.1)
    assert sum(len(g["params"]) for g in groups) == sum(p.requires_grad for p in model.parameters())


def test_phase_freezing_and_unfreezing():
    from hf_pcme.training.optim import freeze_towers

    # InfoNCE does not use a, b: the model keeps them fixed, and no phase may unfreeze them.
    model = _tiny_model(head_type="deterministic", loss_type="infonce")
    freeze_towers(model, ["vision", "word_embeddings"])
    assert not any(p.requires_grad for p in model.vision_model.parameters())
    assert not model.text_model.word_embeddings.weight.requires_grad
    assert model.text_model.gru.weight_ih_l0.requires_grad
    assert not model.vision_model.training  # frozen BatchNorm statistics
    freeze_towers(model, [])
    assert all(p.requires_grad for n, p in model.named_parameters() if n not in ("negative_scale", "shift"))
    assert not model.negative_scale.requires_grad and not model.shift.requires_grad


def test_optimizer_choice(monkeypatch):
    import sys
    import types

    import torch

    from hf_pcme.training import optim

    model = _tiny_model()
    monkeypatch.setattr(optim, "adamp_available", lambda: False)
    assert type(optim.build_optimizer(model, 1e-3)) is torch.optim.AdamW
    with pytest.raises(ValueError, match="adamp package is not installed"):
        optim.build_optimizer(model, 1e-3, name="adamp")

    class FakeAdamP(torch.optim.AdamW):
        pass

    monkeypatch.setitem(sys.modules, "adamp", types.SimpleNamespace(AdamP=FakeAdamP))
    monkeypatch.setattr(optim, "adamp_available", lambda: True)
    assert type(optim.build_optimizer(model, 1e-3)) is FakeAdamP  # "auto" prefers AdamP, as PCME
    assert type(optim.build_optimizer(model, 1e-3, name="adamw")) is torch.optim.AdamW


def test_phase_plan_from_epochs_steps_and_max_steps():
    from hf_pcme.training.trainer import plan_phases

    recipe = load_recipe(REPO / "configs" / "coco_pcme.yaml")
    phases = plan_phases(recipe, steps_per_epoch=100)
    assert [(p.steps, p.frozen, p.lr) for p in phases] == [
        (3000, ["vision", "word_embeddings"], 2e-4),
        (3000, [], pytest.approx(2e-5)),
    ]
    capped = load_recipe(REPO / "configs" / "coco_pcme.yaml", ["train.max_steps=3500", "train.phase1_steps=10"])
    assert [p.steps for p in plan_phases(capped, steps_per_epoch=100)] == [10, 3000]
    capped = load_recipe(REPO / "configs" / "coco_pcme.yaml", ["train.max_steps=50"])
    assert [p.steps for p in plan_phases(capped, steps_per_epoch=100)] == [50, 0]


def test_init_log_sigma2_sets_the_starting_variance():
    from hf_pcme.testing import tiny_text_config, tiny_vision_config
    from hf_pcme.training.builders import build_model

    overrides = [f"model.vision_config={tiny_vision_config()}", f"model.text_config={tiny_text_config()}",
                 "model.embed_dim=8", "model.init_log_sigma2=-5"]
    model = build_model(load_recipe(None, overrides))
    for head in (model.image_head, model.text_head):
        assert head.uncertainty_branch.bias.eq(-5.0).all()
    with pytest.raises(ValueError, match="probabilistic"):
        build_model(load_recipe(None, overrides + ["model.head_type=deterministic", "model.loss_type=infonce"]))
