"""The HParams tab as TensorBoard builds it: the plugin's own handlers (``get_experiment``,
``list_session_groups``) over TensorBoard's own event reader, on a log folder like a user's: a
two-run beta sweep and a VQ-VAE run, one of them with test numbers."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from tensorboard import context
from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
from tensorboard.plugins import base_plugin
from tensorboard.plugins.hparams import (
    api_pb2,
    backend_context,
    get_experiment,
    list_session_groups,
)

from experiments.train import CONFIG_DIR
from tests.cli import QUICK, read_metrics, run_cli
from vae.training import tags
from vae.training.runs import register_resolvers
from vae.training.tensorboard import (
    config_hparams,
    task_overrides,
    trial_name,
    write_test_events,
)

TINY = ["debug=limit"]  # a few batches, 2 epochs
TEST_METRICS = {tags.TEST_NLL_IW: 30.25, tags.TEST_ELBO: -31.5}
# The tab's front end (tf-hparams-query-pane) ticks the first 5 hyper-parameters after a
# stable sort that puts those whose values differ first, and the first 5 metrics.
SHOWN_BY_DEFAULT = 5


def hparams_tab(logdir: Path) -> tuple[api_pb2.Experiment, list[api_pb2.SessionGroup]]:
    """(columns, rows) of the HParams tab of ``tensorboard --logdir logdir``."""
    multiplexer = plugin_event_multiplexer.EventMultiplexer()
    multiplexer.AddRunsFromDirectory(str(logdir))
    multiplexer.Reload()
    provider = data_provider.MultiplexerDataProvider(multiplexer, str(logdir))
    tb_context = base_plugin.TBContext(
        logdir=str(logdir), multiplexer=multiplexer, data_provider=provider
    )
    backend = backend_context.Context(tb_context)
    request = context.RequestContext()
    experiment = get_experiment.Handler(
        request, backend, "", api_pb2.GetExperimentRequest(hparams_limit=1000)
    ).run()
    rows = list_session_groups.Handler(
        request,
        backend,
        "",
        api_pb2.ListSessionGroupsRequest(
            allowed_statuses=[api_pb2.STATUS_UNKNOWN, api_pb2.STATUS_SUCCESS],
            start_index=0,
            slice_size=100,
        ),
    ).run()
    return experiment, list(rows.session_groups)


def composed(*overrides: str, output_dir: Path):
    """The config of `vae-train *overrides` as the job sees it (with Hydra's own node)."""
    register_resolvers()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        overrides = [*overrides, f"paths.output_dir={output_dir}"]
        return compose("config", overrides=overrides, return_hydra_config=True)


# --- fast: what a run records --------------------------------------------------------------------


def test_the_record_leaves_out_copies_of_other_keys_and_hydra_flags(tmp_path: Path):
    params = config_hparams(composed("model.beta=4", output_dir=tmp_path))
    assert params["model.beta"] == 4.0
    assert params["model.hidden_dims"] == "[256, 128]"
    # `model.regulariser.beta: ${model.beta}` and the like only repeat their source.
    assert "model.regulariser.beta" not in params and "model.encoder.arch" not in params
    assert "model.optimizer.lr" not in params and "model.optimizer._partial_" not in params
    # Keys of the part's own stay.
    assert params["model.regulariser.warmup_steps"] == 1000
    assert params["name"] == "vae_digits" and params["seed"] == 0
    assert not [k for k in params if k.startswith(("paths.", "logger.", "callbacks.", "hydra."))]


def test_trial_names_say_what_was_set_and_stay_distinct(tmp_path: Path):
    first = trial_name(["model.beta=4"], tmp_path / "a", default="vae_digits")
    second = trial_name(["model.beta=4"], tmp_path / "b", default="vae_digits")
    assert first.startswith("model.beta=4 #") and second.startswith("model.beta=4 #")
    assert first != second
    assert trial_name([], tmp_path / "a", default="vae_digits").startswith("vae_digits #")
    assert task_overrides() == []  # outside a Hydra job


# --- slow: the tab of real runs --------------------------------------------------------------------


@pytest.fixture(scope="module")
def logdir(tmp_path_factory) -> Path:
    """logs/ of `vae-train -m model.beta=0.5,4` and of a VQ-VAE run; the first job also holds
    test/* numbers, written as vae-eval writes them (``write_test_events``)."""
    workdir = tmp_path_factory.mktemp("hparams_tab")
    run_cli("vae-train", "-m", "model.beta=0.5,4", *TINY, *QUICK, cwd=workdir)
    run_cli("vae-train", "model=vqvae", "model.num_codes=16", *TINY, *QUICK, cwd=workdir)
    first_job = next((workdir / "logs" / "vae_digits").glob("multirun_*/0_*"))
    write_test_events(first_job, TEST_METRICS, step=read_metrics(first_job)["global_step"])
    return workdir / "logs"


@pytest.mark.slow
def test_columns_hold_every_models_keys_and_differing_ones_are_shown_first(logdir: Path):
    experiment, _ = hparams_tab(logdir)
    columns = {info.name: info for info in experiment.hparam_infos}
    assert {"model.beta", "model.num_codes", "model.latent_dim", "trainer.max_epochs"} <= set(
        columns
    )
    assert columns["model.beta"].differs and not columns["trainer.max_epochs"].differs
    order = sorted(experiment.hparam_infos, key=lambda info: not info.differs)  # front end's sort
    shown = order[:SHOWN_BY_DEFAULT]
    assert all(info.differs for info in shown), [info.name for info in shown]
    assert "model.beta" in [info.name for info in shown]


@pytest.mark.slow
def test_metrics_cover_every_model_and_the_test_split(logdir: Path):
    experiment, _ = hparams_tab(logdir)
    metrics = {info.name.tag for info in experiment.metric_infos}
    expected = {
        tags.VAL_ELBO,
        tags.VAL_ACTIVE_UNITS,
        tags.VAL_PERPLEXITY,
        tags.VAL_CODEBOOK_USAGE,
        tags.TEST_NLL_IW,
        tags.TEST_ELBO,
    }
    assert expected <= metrics, sorted(expected - metrics)


@pytest.mark.slow
def test_each_run_is_one_row_with_a_short_distinct_name_and_its_final_numbers(logdir: Path):
    _, rows = hparams_tab(logdir)
    names = [row.name for row in rows]
    assert len(rows) == 3 and len(set(names)) == 3, names
    # What the user set, as typed (less paths, device and progress bar: QUICK), then a short
    # id; not the run directory's path, whose common start is all a narrow column shows.
    settings = ("model.beta=0.5 debug=limit", "model.beta=4 debug=limit")
    vq_settings = "model=vqvae model.num_codes=16 debug=limit"
    by_settings = {
        name.rpartition(" #")[0]: row
        for name, row in zip(names, rows, strict=True)
        if re.fullmatch(r".+ #[0-9a-f]{6}", name)
    }
    assert set(by_settings) == {*settings, vq_settings}, names
    for row in rows:
        (session,) = row.sessions  # never two runs averaged into one row
        run_dir = logdir / session.name
        metrics = read_metrics(run_dir)
        values = {value.name.tag: value.value for value in row.metric_values}
        assert values[tags.VAL_ELBO] == pytest.approx(metrics[tags.VAL_ELBO], rel=1e-6)
    evaluated = by_settings[settings[0]]
    values = {value.name.tag: value.value for value in evaluated.metric_values}
    assert values[tags.TEST_NLL_IW] == TEST_METRICS[tags.TEST_NLL_IW]
    vq = {value.name.tag: value.value for value in by_settings[vq_settings].metric_values}
    assert tags.VAL_PERPLEXITY in vq and tags.VAL_CODEBOOK_USAGE in vq
    assert by_settings[vq_settings].hparams["model.num_codes"].number_value == 16
