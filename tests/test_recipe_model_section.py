"""The recipe's model section is PCMEConfig's arguments: same results for every shipped recipe, PCMEConfig's checks."""

import inspect
import json
from pathlib import Path

import pytest

from hf_pcme import PCMEConfig
from hf_pcme.testing import tiny_text_config, tiny_vision_config
from hf_pcme.training.config import PCME_CONFIG_FIELDS, load_recipe, pcme_config_kwargs

REPO = Path(__file__).resolve().parents[1]
# Written by the code before the model section was derived from PCMEConfig (ModelRecipe listed the
# fields, builders._CONFIG_FIELDS picked them): recipe.model.to_dict and the built PCMEConfig per recipe.
BEFORE = json.loads((REPO / "tests/reference/recipe_model_sections.json").read_text(encoding="utf-8"))
MINIMAL = ["model.vision_config={model_type: resnet}"]


@pytest.mark.parametrize("name", sorted(BEFORE))
def test_shipped_recipe_builds_the_same_config_as_before(name):
    recipe = load_recipe(REPO / "configs" / f"{name}.yaml")
    config = PCMEConfig(vision_config=tiny_vision_config(), text_config=tiny_text_config(),
                        **pcme_config_kwargs(recipe.model)).to_dict()
    assert {key: config[key] for key in BEFORE[name]["pcme_config"]} == BEFORE[name]["pcme_config"]
    model_section = recipe.to_dict()["model"]
    assert {key: model_section[key] for key in BEFORE[name]["recipe_model"]} == BEFORE[name]["recipe_model"]


def test_every_snapshot_recipe_still_ships():
    # Recipes added after the snapshot are not in it; none of those it holds may disappear unnoticed.
    assert set(BEFORE) <= {path.stem for path in (REPO / "configs").glob("*.yaml")}


def test_model_keys_are_the_config_arguments_less_the_towers():
    own = [name for name in inspect.get_annotations(PCMEConfig) if name not in ("vision_config", "text_config")]
    assert list(PCME_CONFIG_FIELDS) == own
    defaults = load_recipe(None, MINIMAL).model
    plain = PCMEConfig()
    for name in own:  # same defaults as PCMEConfig (a missing mapping is an empty one there too)
        assert getattr(defaults, name) == getattr(plain, name), name


def test_config_argument_not_listed_anywhere_in_training_is_a_recipe_key():
    recipe = load_recipe(None, MINIMAL + ["model.inference_seed=null", "model.initializer_range=0.1"])
    assert pcme_config_kwargs(recipe.model)["inference_seed"] is None
    assert pcme_config_kwargs(recipe.model)["initializer_range"] == 0.1


@pytest.mark.parametrize(
    "overrides, key, says",
    [
        (["model.embed_dim=0"], "model.embed_dim", "positive integer"),
        (["model.match_function=exact"], "model.match_function", "csd, sampled"),
        (["model.head_type=deterministic", "model.loss_type=infonce", "model.init_log_sigma2=-5"],
         "model.init_log_sigma2", "probabilistic"),
        (["model.num_samples=2.5"], "model.num_samples", "must be int"),
    ],
)
def test_config_checks_run_at_load_and_name_the_recipe_key(overrides, key, says):
    with pytest.raises(ValueError) as error:
        load_recipe(None, MINIMAL + overrides)
    assert f"'{key}'" in str(error.value) and says in str(error.value)


def test_eval_ranking_takes_the_names_of_the_metrics_registry():
    from hf_pcme.metrics import SCORERS

    for name in SCORERS:
        assert load_recipe(None, MINIMAL + [f"eval.ranking={name}"]).eval.ranking == name
    with pytest.raises(ValueError, match=r"'eval\.ranking'.*cosine"):
        load_recipe(None, MINIMAL + ["eval.ranking=cosin"])
