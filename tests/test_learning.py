"""The learning check catches what breaks image-to-video training: one mutation per test.

Each test trains a LoRA on the demo's checkpoint, learning dataset and config with the host's
per-step code (tests/_learning_run.py: the host's ``prepare_batch`` and ``loss`` around our
family hooks, in this process, so that six trainings fit the suite's budget) and then runs the
learning check (``simpletuner_longcat_video.testing.learning``). Unchanged, the LoRA lowers the latent
error by ``THRESHOLD`` or more (the same check the demo's real host run passes in
test_i2v_training.py); with one piece of the I2V batch broken inside
``simpletuner_longcat_video.host.family`` (tests/fault_injection/learning_mutations.py), it does not.
"""

from __future__ import annotations

import pytest
from _learning_run import train_and_check
from conftest import load_demo
from fault_injection import learning_mutations

from simpletuner_longcat_video.host import family
from simpletuner_longcat_video.testing.learning import training_pairs

pytestmark = pytest.mark.slow
demo = load_demo()


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("learning")
    config = demo.prepare(workdir, learning=True)
    train = workdir / "datasets" / "longcat-video" / "train"
    return workdir / "LongCat-Video-tiny", config, training_pairs(train / "clips", train / "start_frames")


@pytest.fixture(scope="module")
def control(prepared):
    return train_and_check(*prepared)


def test_the_unbroken_training_step_learns_both_clips(control):
    print(control.table())  # shown by `pytest -rP`: the figures of docs/faults.md
    assert control.passed and control.every_pair_passed, control.table()


@pytest.mark.parametrize(
    "mutation",
    ["flow_sign", "noised_condition_frame", "condition_timestep", "reversed_timesteps"],
)
def test_a_broken_training_batch_fails_the_learning_check(prepared, control, monkeypatch, mutation):
    learning_mutations.apply(mutation, family, monkeypatch.setattr)
    check = train_and_check(*prepared)
    print(f"{mutation}:\n{check.table()}")
    assert check.before == control.before  # same untrained model, same samples
    assert not check.passed, f"{mutation} was not caught:\n{check.table()}"
    assert check.error_after > 2 * control.error_after, check.table()


def test_the_condition_frame_left_in_the_loss_is_caught_by_the_loss_test(monkeypatch):
    # The learning check cannot see this one (docs/faults.md says why: the extra term is noise the
    # LoRA cannot fit, and the generated frames are learnt as well); the host-loss test does.
    from test_training_batch import test_host_loss_ignores_the_condition_frame_and_scores_the_others as loss_test

    loss_test()  # unbroken: passes
    learning_mutations.apply("condition_frame_in_loss", family, monkeypatch.setattr)
    with pytest.raises(AssertionError):
        loss_test()
