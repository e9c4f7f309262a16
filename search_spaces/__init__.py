"""Declarative search spaces (YAML) per training method, compiled to Optuna define-by-run spaces.

Typical use (the sweep driver)::

    space = build_search_space([load_space("lora")])
    search = OptunaSearch(
        space=space.define_by_run,
        metric="score", mode="max",
        sampler=make_sampler(SamplerSettings(seed=0)),
        storage=make_storage("sqlite:///runs/x/optuna.db"),
        points_to_evaluate=space.warm_start_points(),
    )

The file format is described in :mod:`search_spaces.loading`, the naming of parameters (plain
dotted keys out, method-qualified Optuna names for keys shared by several methods) in
:mod:`search_spaces.space`. Shipped spaces: ``lora.yaml``.
"""

from search_spaces.errors import SearchSpaceError
from search_spaces.loading import METHOD, MethodSpace, available_spaces, load_space, parse_space
from search_spaces.optuna_glue import SamplerSettings, make_sampler, make_storage, parse_storage_url
from search_spaces.params import CategoricalParam, FloatParam, IntParam, Param
from search_spaces.space import SearchSpace, SuggestedParam, build_search_space

__all__ = [
    "METHOD",
    "CategoricalParam",
    "FloatParam",
    "IntParam",
    "MethodSpace",
    "Param",
    "SamplerSettings",
    "SearchSpace",
    "SearchSpaceError",
    "SuggestedParam",
    "available_spaces",
    "build_search_space",
    "load_space",
    "make_sampler",
    "make_storage",
    "parse_storage_url",
    "parse_space",
]
