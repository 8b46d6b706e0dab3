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
from _learning_run import train_and_check, train_continuation_and_check
from conftest import load_demo
from fault_injection import learning_mutations

from simpletuner_longcat_video.host import family
from simpletuner_longcat_video.testing.learning import THRESHOLD, training_clips, training_pairs
from simpletuner_longcat_video.testing.tiny import build_continuation_learning_dataset

pytestmark = pytest.mark.slow
demo = load_demo()
# Continuation: 9-frame clips continued from their first 5 frames (2 condition latents, 1 generated).
CONDITION_FRAMES = 5


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


@pytest.fixture(scope="module")
def continuation(prepared, tmp_path_factory):
    # The same checkpoint and config; the continuation counterpart of the learning dataset: which
    # colour follows can only be read from the clip's own first frames.
    folders = build_continuation_learning_dataset(
        tmp_path_factory.mktemp("continuation"), frames=demo.TINY_FRAMES, condition_frames=CONDITION_FRAMES
    )
    checkpoint, config, _ = prepared
    return checkpoint, config, training_clips(folders["train_clips"])


@pytest.fixture(scope="module")
def continuation_control(continuation):
    return train_continuation_and_check(*continuation, CONDITION_FRAMES)


def test_the_unbroken_continuation_step_learns_both_clips(continuation_control):
    # The I2V check's threshold: continued from its first frames, each clip's error drops as much.
    print(continuation_control.table())
    assert continuation_control.threshold == THRESHOLD
    assert continuation_control.passed and continuation_control.every_pair_passed, continuation_control.table()


def test_a_noised_continuation_condition_fails_the_learning_check(continuation, continuation_control, monkeypatch):
    learning_mutations.apply("noised_continuation_frames", family, monkeypatch.setattr)
    check = train_continuation_and_check(*continuation, CONDITION_FRAMES)
    print(f"noised_continuation_frames:\n{check.table()}")
    assert check.before == continuation_control.before
    assert not check.passed, check.table()
    assert check.error_after > 2 * continuation_control.error_after, check.table()
