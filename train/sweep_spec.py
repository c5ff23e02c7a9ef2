"""The sweep file: W&B's sweep format, checked against the trainer's schema and translated to Optuna.

``configs/sweep.yml`` is the file ``wandb sweep`` reads. ``check_sweep`` lists every problem of
one (W&B format, dotted config keys, values the schema accepts, anything Optuna cannot do) and
``translate`` turns a valid one into what ``train.sweep`` hands to Optuna:

    value: x                               a fixed override (not a search dimension)
    values: [...]                          CategoricalDistribution (lists are passed as their text)
    min/max, distribution: uniform         FloatDistribution(min, max)
                           int_uniform     IntDistribution(min, max)   (two integers and no distribution)
                           log_uniform_values    FloatDistribution(min, max, log=True)
                           q_uniform       IntDistribution(min, max, step=q) for integers, else Float...(step=q)
                           q_log_uniform_values  IntDistribution(min, max, log=True)  (q: 1, integers)
    method: grid | random | bayes          GridSampler | RandomSampler | TPESampler
    metric: {name, goal}                   the objective and the study's direction
    early_terminate: {type: hyperband, min_iter, eta, max_iter}
                                           HyperbandPruner(min_resource, reduction_factor, max_resource)
"""

from __future__ import annotations

import hashlib
import math
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from pydantic import BaseModel

from train.config import Config, load_config, read_yaml_file
from train.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
# Keys the sweep itself sets for every trial; a sweep parameter must not fight over them.
MANAGED_KEYS = ("experiment.name", "experiment.output_dir", "logging.wandb.group")
METHODS = ("grid", "random", "bayes")
DISTRIBUTIONS = ("constant", "categorical", "int_uniform", "uniform", "log_uniform_values", "q_uniform",
                 "q_log_uniform_values")
SWEEP_KEYS = ("name", "description", "project", "entity", "program", "method", "metric", "parameters",
              "early_terminate", "command", "run_cap")
PARAMETER_KEYS = ("value", "values", "distribution", "min", "max", "q")
HYPERBAND_KEYS = ("type", "min_iter", "max_iter", "eta")


# --------------------------------------------------------------------------------------------------
# Small readers of the file
# --------------------------------------------------------------------------------------------------


def config_keys(cls: type[BaseModel] = Config, prefix: str = "") -> set[str]:
    """Every dotted leaf key of the config schema, e.g. ``training.optimizer.lr``."""
    keys: set[str] = set()
    for name, f in cls.model_fields.items():
        ann = f.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys |= config_keys(ann, f"{prefix}{name}.")
        else:
            keys.add(prefix + name)
    return keys


def agent_text(value: Any) -> str:
    """A value as W&B's agent writes it on the command line (``str()`` of the JSON value:
    ``1e-05``, ``None``, ``True``, ``[16, 32]``); the trainer's overrides must read it back typed."""
    return str(value)


def base_config_path(spec: dict) -> str:
    """The ``--config`` file named in the sweep's ``command`` (default: configs/model_config.yml)."""
    command = [str(c) for c in spec.get("command") or []]
    if "--config" in command and command.index("--config") + 1 < len(command):
        return command[command.index("--config") + 1]
    return "configs/model_config.yml"


def candidate_values(spec: dict) -> list[Any]:
    """Values of one parameter spec that must each validate (all of a list, the ends of a range)."""
    if "value" in spec:
        return [spec["value"]]
    if "values" in spec:
        return list(spec["values"]) if isinstance(spec["values"], list) else []
    return [spec[k] for k in ("min", "max") if k in spec]


def distribution_name(p: dict) -> str:
    """The W&B distribution of a parameter spec, inferred as W&B does when it is not given."""
    if p.get("distribution") is not None:
        return str(p["distribution"])
    if "value" in p:
        return "constant"
    if "values" in p:
        return "categorical"
    return "int_uniform" if _is_int(p.get("min")) and _is_int(p.get("max")) else "uniform"


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# --------------------------------------------------------------------------------------------------
# Checking
# --------------------------------------------------------------------------------------------------


def _format_problems(spec: dict) -> list[str]:
    """The W&B format itself: keys, method, metric, program, command, early_terminate, run_cap."""
    problems = [f"'{k}' is not a W&B sweep key this runner can translate (known: {', '.join(SWEEP_KEYS)})"
                for k in spec if k not in SWEEP_KEYS]
    if spec.get("method") not in METHODS:
        problems.append(f"method must be one of {', '.join(METHODS)} (got {spec.get('method')!r})")
    metric = spec.get("metric") or {}
    if not isinstance(metric, dict) or not metric.get("name"):
        problems.append("metric must be a mapping with a name (e.g. val/rmse) and a goal (minimize | maximize)")
    else:
        if metric.get("goal", "minimize") not in ("minimize", "maximize"):
            problems.append(f"metric.goal must be minimize or maximize (got {metric.get('goal')!r})")
        problems += [f"metric.{k} cannot be translated to Optuna (it has no stop-at-target); remove it"
                     for k in metric if k not in ("name", "goal")]
    if spec.get("program") != "train/main.py":
        problems.append(f"program must be train/main.py (got {spec.get('program')!r})")
    command = [str(c) for c in spec.get("command") or []]
    if "${args_no_hyphens}" not in command:
        problems.append("command must pass ${args_no_hyphens} (the trainer reads key=value overrides, not --key=value)")
    if "${program}" not in command:
        problems.append("command must contain ${program}")
    if "run_cap" in spec and not (_is_int(spec["run_cap"]) and spec["run_cap"] >= 1):
        problems.append(f"run_cap must be a positive integer (got {spec['run_cap']!r})")
    return problems + _early_terminate_problems(spec.get("early_terminate"))


def _early_terminate_problems(et: Any) -> list[str]:
    if et is None:
        return []
    if not isinstance(et, dict) or et.get("type") != "hyperband":
        return ["early_terminate must be {type: hyperband, min_iter: N, eta: K} (Optuna's HyperbandPruner)"]
    problems = [f"early_terminate.{k} cannot be translated to Optuna's HyperbandPruner (use min_iter, eta, max_iter)"
                for k in et if k not in HYPERBAND_KEYS]
    if not (_is_int(et.get("min_iter")) and et["min_iter"] >= 1):
        problems.append(f"early_terminate.min_iter must be a positive integer, the first epoch at which a trial "
                        f"can be stopped (got {et.get('min_iter')!r})")
    if "eta" in et and not (_is_int(et["eta"]) and et["eta"] >= 2):
        problems.append(f"early_terminate.eta must be an integer >= 2 (got {et['eta']!r})")
    if "max_iter" in et and not (_is_int(et["max_iter"]) and et["max_iter"] >= (et.get("min_iter") or 1)):
        problems.append(f"early_terminate.max_iter must be an integer >= min_iter (got {et['max_iter']!r})")
    return problems


def _range_problem(dist: str, p: dict) -> str | None:
    """Why ``min``/``max``/``q`` of a range cannot become an Optuna distribution (None: they can)."""
    lo, hi, q = p.get("min"), p.get("max"), p.get("q", 1)
    if not (_is_number(lo) and _is_number(hi)) or lo > hi:
        return f"min and max must be numbers with min <= max (got {lo!r}, {hi!r})"
    if dist in ("int_uniform", "q_log_uniform_values") and not (_is_int(lo) and _is_int(hi)):
        return f"{dist} needs integer min and max (got {lo!r}, {hi!r})"
    if "log" in dist and lo <= 0:
        return f"{dist} needs min > 0 (got {lo!r})"
    if not (_is_number(q) and q > 0):
        return f"q must be a positive number (got {q!r})"
    if dist == "q_log_uniform_values" and q != 1:
        return ("q_log_uniform_values with q other than 1 cannot be translated to Optuna (log and step together): "
                "use q: 1 with integer min/max, log_uniform_values, or values: [...]")
    return None


def _parameter_problems(key: str, p: Any, method: Any) -> list[str]:
    """Format and translation problems of one parameter spec (its values are checked elsewhere)."""
    if isinstance(p, dict) and distribution_name(p) not in DISTRIBUTIONS:
        return [f"parameter '{key}': distribution {distribution_name(p)!r} is not supported offline (use one of "
                f"{', '.join(DISTRIBUTIONS)})"]
    if not isinstance(p, dict) or not ({"value", "values", "min", "max"} & set(p)):
        return [f"parameter '{key}': needs value, values or min/max (W&B sweep format; nested 'parameters' are "
                "not used here)"]
    dist = distribution_name(p)
    unknown = [k for k in p if k not in PARAMETER_KEYS]
    if unknown:
        reason = ("Optuna's samplers draw values uniformly" if unknown[0] == "probabilities"
                  else f"a spec here has only {', '.join(PARAMETER_KEYS)}")
        return [f"parameter '{key}': '{unknown[0]}' cannot be translated to Optuna ({reason}); remove it, or run "
                "this sweep with wandb agent"]
    if method == "grid" and dist not in ("constant", "categorical"):
        return [f"parameter '{key}': a grid needs value or values, not a range"]
    if dist == "constant" and "value" not in p:
        return [f"parameter '{key}': distribution constant needs value"]
    if dist == "categorical":
        values = p.get("values")
        if not isinstance(values, list) or not values:
            return [f"parameter '{key}': values must be a non-empty list"]
        return []
    if dist == "constant":
        return []
    problem = _range_problem(dist, p)
    return [f"parameter '{key}': {problem}"] if problem else []


def _value_problems(key: str, p: dict, config_path: Path, fixed: list[str]) -> list[str]:
    problems = []
    for v in candidate_values(p):
        try:
            load_config(config_path, [*fixed, f"{key}={agent_text(v)}"])
        except ConfigError as e:
            problems += [f"parameter '{key}' value {v!r}: {line}" for line in e.lines]
    return problems


def check_sweep(spec: Any, fixed: list[str] = (), root: Path = ROOT) -> list[str]:
    """Every problem of a parsed sweep file (empty list: valid).

    Checks the W&B format, that Optuna can do what it asks (one line naming each key it cannot), and
    that each parameter is a real dotted config key whose values the schema accepts when passed as
    agent text, on top of the base config and the ``fixed`` overrides.
    """
    if not isinstance(spec, dict):
        return ["the sweep file must be a mapping (method, metric, parameters, program, command)"]
    problems = _format_problems(spec)
    config_path = root / base_config_path(spec)
    params = spec.get("parameters")
    if not isinstance(params, dict) or not params:
        return problems + ["parameters must be a non-empty mapping of dotted config keys to value specs"]
    # The base config with the fixed overrides alone first: if it is wrong, every swept value would
    # repeat the same problem, so it is told once and the values are not tried.
    try:
        load_config(config_path, list(fixed))
        base_ok = True
    except ConfigError as e:
        problems += [f"base config {base_config_path(spec)} with the fixed overrides: {line}" for line in e.lines]
        base_ok = False
    keys = config_keys()
    for key, p in params.items():
        if key not in keys:
            problems.append(f"parameter '{key}' is not a config key (see docs/CONFIG.md for the dotted names)")
        elif key in MANAGED_KEYS:
            problems.append(f"parameter '{key}' is set by the sweep for every trial and cannot be swept")
        elif own := _parameter_problems(key, p, spec.get("method")):
            problems += own
        elif base_ok:
            problems += _value_problems(key, p, config_path, list(fixed))
    return problems


def read_sweep(path: str | Path, fixed: list[str] = ()) -> dict:
    """Read and check a sweep file; raise ``ConfigError`` listing every problem."""
    spec = read_yaml_file(path)
    problems = check_sweep(spec, fixed)
    if problems:
        raise ConfigError([f"{path}: {p}" for p in problems])
    return spec


# --------------------------------------------------------------------------------------------------
# Translation
# --------------------------------------------------------------------------------------------------


def optuna_choice(value: Any) -> Any:
    """A categorical value as Optuna stores it: scalars as they are, anything else (a list such as
    ``[16, 32]``) as its agent text, which is also exactly what the trial's command line gets."""
    return value if value is None or isinstance(value, (bool, int, float, str)) else agent_text(value)


def to_distribution(p: dict) -> BaseDistribution | None:
    """The Optuna distribution of one (checked) parameter spec; None for a fixed ``value``."""
    dist = distribution_name(p)
    if dist == "constant":
        return None
    if dist == "categorical":
        return CategoricalDistribution([optuna_choice(v) for v in p["values"]])
    lo, hi, q = p["min"], p["max"], p.get("q", 1)
    if dist == "int_uniform":
        return IntDistribution(lo, hi)
    if dist == "q_log_uniform_values":
        return IntDistribution(lo, hi, log=True)
    if dist == "q_uniform" and _is_int(lo) and _is_int(hi) and _is_int(q):
        return IntDistribution(lo, hi, step=q)
    if dist == "q_uniform":
        return FloatDistribution(float(lo), float(hi), step=float(q))
    return FloatDistribution(float(lo), float(hi), log=dist == "log_uniform_values")


@dataclass
class SearchSpace:
    """A checked sweep file in Optuna's terms."""

    distributions: dict[str, BaseDistribution]  # what the sampler chooses, in file order
    fixed_params: dict[str, Any]  # `value:` parameters: the same for every trial
    metric: str
    direction: str  # minimize | maximize
    method: str
    early_terminate: dict | None = None
    run_cap: int | None = None
    grid_size: int | None = field(default=None)


def translate(spec: dict) -> SearchSpace:
    """The search space of a sweep file that ``check_sweep`` found valid."""
    dists, fixed = {}, {}
    for key, p in spec["parameters"].items():
        d = to_distribution(p)
        if d is None:
            fixed[key] = p["value"]
        else:
            dists[key] = d
    grid = math.prod(len(d.choices) for d in dists.values()) if spec["method"] == "grid" else None
    return SearchSpace(dists, fixed, spec["metric"]["name"], spec["metric"].get("goal", "minimize"), spec["method"],
                       spec.get("early_terminate"), spec.get("run_cap"), grid)


def trial_seed(seed: int, number: int) -> int:
    """The seed of trial ``number``: a function of (``--seed``, trial number) only, not of the
    process that asks (PYTHONHASHSEED-independent)."""
    return int(hashlib.sha256(f"{seed}:{number}".encode()).hexdigest()[:8], 16)


class TrialSeededSampler(optuna.samplers.BaseSampler):
    """Delegates each trial to a fresh sampler seeded by (seed, trial number).

    Samplers carry one random stream per instance: two sweep processes on one study with the same
    ``--seed`` would draw the same values in lockstep. Seeding per trial number instead makes trial
    *k*'s random draws the same whichever process asks for it, and different from trial *k+1*'s; TPE
    still conditions on the whole study's history, which lives in the storage.
    """

    def __init__(self, make: Callable[[int], optuna.samplers.BaseSampler], seed: int):
        self._make, self._seed = make, seed
        self._by_number: dict[int, optuna.samplers.BaseSampler] = {}
        self._lock = threading.Lock()

    def _for(self, trial) -> optuna.samplers.BaseSampler:
        with self._lock:
            if trial.number not in self._by_number:
                self._by_number[trial.number] = self._make(trial_seed(self._seed, trial.number))
            return self._by_number[trial.number]

    def infer_relative_search_space(self, study, trial):
        return self._for(trial).infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        return self._for(trial).sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self._for(trial).sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study, trial):
        self._for(trial).before_trial(study, trial)

    def after_trial(self, study, trial, state, values):
        self._for(trial).after_trial(study, trial, state, values)
        with self._lock:
            self._by_number.pop(trial.number, None)

    def reseed_rng(self) -> None:
        pass  # the seeds are per trial by design


def is_fresh(t) -> bool:
    """A trial that takes a place of --max-runs: not a retry (retries finish the place of the trial
    they retry), not a surplus trial refused after ask."""
    return "retry_of" not in t.user_attrs and not t.user_attrs.get("surplus")


class SweepGridSampler(optuna.samplers.GridSampler):
    """Optuna's GridSampler, except that the k-th trial taking a place of --max-runs gets grid point
    k: Optuna's gives it to trial *number* k, and the numbers a retry (or a refused surplus trial)
    takes would leave their grid points out."""

    def before_trial(self, study, trial):
        if "grid_id" in trial.system_attrs or "fixed_params" in trial.system_attrs:
            return  # a retry: its parameters are the ones of the trial it retries
        place = sum(1 for t in study.get_trials(deepcopy=False) if t.number < trial.number and is_fresh(t))
        if place >= len(self._all_grids):
            return super().before_trial(study, trial)
        study._storage.set_trial_system_attr(trial._trial_id, "search_space", self._search_space)
        study._storage.set_trial_system_attr(trial._trial_id, "grid_id", place)

    def after_trial(self, study, trial, state, values):
        pass  # Optuna's calls study.stop() once the grid is done, which raises outside optimize(): the sweep counts


def startup_trials(max_runs: int) -> int:
    """TPE's random start: Optuna's default of 10 would leave a short sweep all random."""
    return max(2, min(10, max_runs // 3))


def make_sampler(space: SearchSpace, seed: int, max_runs: int) -> optuna.samplers.BaseSampler:
    if space.method == "grid":
        # One grid order for every process (the seed shuffles it; trial k takes grid point k): seeding
        # it per trial would give each trial another order, and duplicates.
        return SweepGridSampler({k: list(d.choices) for k, d in space.distributions.items()}, seed=seed)
    if space.method == "random":
        return TrialSeededSampler(lambda s: optuna.samplers.RandomSampler(seed=s), seed)
    n_startup = startup_trials(max_runs)
    return TrialSeededSampler(
        lambda s: optuna.samplers.TPESampler(seed=s, n_startup_trials=n_startup, constant_liar=True), seed)


def make_pruner(space: SearchSpace, epochs: int | None) -> optuna.pruners.BasePruner:
    """Hyperband over epochs; ``max_resource`` is ``max_iter``, else the trials' ``training.epochs``
    (``epochs`` None: it is swept, and Optuna estimates it from the first finished trial)."""
    et = space.early_terminate
    if not et:
        return optuna.pruners.NopPruner()
    return optuna.pruners.HyperbandPruner(min_resource=et["min_iter"],
                                          max_resource=et.get("max_iter") or epochs or "auto",
                                          reduction_factor=et.get("eta", 3))


def describe(space: SearchSpace, seed: int, max_runs: int | None, epochs: int | None) -> list[str]:
    """What ``--check`` prints: each parameter's Optuna distribution, the sampler and the pruner."""
    lines = [f"  {k}: {d!r}" for k, d in space.distributions.items()]
    lines += [f"  {k}: fixed {agent_text(v)}" for k, v in space.fixed_params.items()]
    sampler = {"grid": f"GridSampler ({space.grid_size} combinations, in an order shuffled by --seed {seed})",
               "random": f"RandomSampler, seeded per trial number from --seed {seed}",
               "bayes": f"TPESampler ({startup_trials(max_runs or 0)} random trials first, constant liar), seeded per "
                        f"trial number from --seed {seed}"}
    lines.append(f"  sampler: {sampler[space.method]}")
    pruner = make_pruner(space, epochs)
    if isinstance(pruner, optuna.pruners.HyperbandPruner):
        et = space.early_terminate
        lines.append(f"  pruner: HyperbandPruner(min_resource={et['min_iter']}, "
                     f"max_resource={et.get('max_iter') or epochs or 'auto'}, reduction_factor={et.get('eta', 3)})"
                     " over epochs")
    else:
        lines.append("  pruner: none (add early_terminate: {type: hyperband, min_iter: N} to stop bad trials early)")
    lines.append(f"  objective: {space.metric} ({space.direction})")
    return lines
