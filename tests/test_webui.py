"""The quickstart's WebUI flow, in a real headless Chromium against the real `simpletuner server`.

A user starts the host's server, answers its first-run dialog, creates an environment with model
family LongCat-Video and flavour ``final``, sees the family's I2V datasets (clips with ``is_i2v``
linked to their start-frame dataset), uploads a start frame through the host's dataset file
browser, enters a prompt and the host's "Validation Input Images" (start frame path + prompt),
saves, and presses Run. SimpleTuner 4.10.1 only queues a Run until a GPU is detected, so the
preview is then rendered on the CPU by the host's own ``simpletuner train --env`` from exactly
the environment the UI saved (``validation_on_startup``: the image-to-video preview, then one
training step on the tiny checkpoint).

The one step not done in the browser writes the CPU sizes of ``examples/demo.py`` (tiny checkpoint
path, 64x64, 9 frames, one step) into the environment the UI created, and the quickstart's paired
dataset list beside it; typing two dozen numbers into the host's forms would test the host's
forms, not the plugin. See docs/webui.md for the limits found on the way.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from browser import chromium_page, missing_setup
from conftest import host_environ, load_demo

from simpletuner_longcat_video import spec
from simpletuner_longcat_video.testing.hostserver import host_server

pytestmark = pytest.mark.slow

ENVIRONMENT = "longcat-edit"
PROMPT = "the red square slides to the right"
PREVIEW_FOLDER = "previews"
TRAINING_TIMEOUT = 420
# The plugin's keys set in the UI (both differ from their defaults, so a saved value came from the UI).
UI_KEYS = {"attention_implementation": "sdpa", "longcat_bsa_sparsity": 0.5}


demo = load_demo()


def _read_json_when_written(path: Path) -> dict | None:
    """The JSON in ``path``, or None while the server is still writing it (the file exists but is empty or partial)."""
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _wait_for(predicate, timeout: float, what: str, interval: float = 1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = predicate()
        if found:
            return found
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _selected_text(select) -> str:
    return select.evaluate("s => s.selectedIndex < 0 ? '' : s.options[s.selectedIndex].text.trim()")


def _open_tab(page, name: str) -> None:
    page.locator(".sidebar, nav").get_by_text(name, exact=True).first.click()
    page.wait_for_load_state("networkidle")


def _onboard(page, expect, configs: Path, output: Path, datasets: Path) -> dict:
    """The host's first-run dialog: three folders, the GPU step, then the first environment."""
    seen: dict = {}
    steps = page.locator(".onboarding-step-content")
    for value, title in (
        (configs, "Output Directory"),
        (output, "Datasets Directory"),
        (datasets, "GPU Configuration"),
    ):
        field = page.locator("#onboarding-input")
        expect(field).to_be_visible(timeout=60_000)
        field.fill(str(value))
        page.get_by_role("button", name="Save & Continue").click()
        expect(steps).to_contain_text(title)
    page.get_by_role("button", name="Save & Continue").click()

    form = page.locator(".environment-onboarding")
    expect(form).to_be_visible()
    family = form.locator('select[x-model="newEnvironment.model_family"]')
    flavour = form.locator('select[x-model="newEnvironment.model_flavour"]')
    expect(family.locator('option[value="longcat_video"]')).to_have_count(1, timeout=60_000)
    form.get_by_placeholder("my-first-project").fill(ENVIRONMENT)
    family.select_option("longcat_video")
    expect(flavour.locator("option")).to_have_text(["Default", "final"])
    flavour.select_option("final")
    seen["flavour_options"] = flavour.locator("option").all_inner_texts()
    form.get_by_role("button", name="Create Environment").click()
    return seen


def _apply_cpu_sizes(workdir: Path, configs: Path) -> dict:
    """examples/demo.py's CPU sizes into the environment the UI created, and its paired dataset list."""
    environment = configs / ENVIRONMENT
    path = environment / "config.json"
    config = json.loads(path.read_text())
    created = dict(config)
    sized = json.loads((workdir / "config" / "config.json").read_text())
    chosen_in_ui = {"model_family", "model_flavour", "model_type", "data_backend_config"}
    config.update({f"--{key}": value for key, value in sized.items() if key not in chosen_in_ui})
    # The preview comes from the uploaded start frame (not the eval split), rendered before one step.
    config.update(
        {
            "--validation_using_datasets": False,
            "--validation_on_startup": True,
            "--max_train_steps": 1,
            "--validation_steps": 1,
            "--checkpoint_step_interval": 1,
        }
    )
    path.write_text(json.dumps(config, indent=2))
    shutil.copy(workdir / "config" / "multidatabackend.json", environment / "multidatabackend.json")
    return created


def _dataset_card(page, dataset_id: str):
    return page.locator(".dataset-list-item-wrapper").filter(
        has=page.locator(f'.dataset-list-item[data-dataset-id="{dataset_id}"]')
    )


def _read_datasets(page, expect) -> dict:
    _open_tab(page, "Dataset")
    clips = _dataset_card(page, "longcat-video-train")
    video = clips.get_by_role("button", name="Video", exact=True).first
    # The tab's intro card may cover the list, and may show only after the tab has loaded; other
    # tabs' dismissed hints leave hidden "Dismiss" buttons in the page.
    dismiss = page.get_by_role("button", name="Dismiss").locator("visible=true").first
    expect(video.or_(dismiss)).to_be_visible(timeout=60_000)
    if dismiss.is_visible():
        dismiss.click()
    expect(clips).to_have_count(1, timeout=60_000)
    video.click()
    i2v = page.locator("#video-i2v-longcat-video-train").first
    expect(i2v).to_be_visible()
    seen = {"clips_is_i2v": i2v.is_checked()}
    clips.get_by_role("button", name="Conditioning", exact=True).first.click()
    linked = clips.locator("select[multiple]").first
    expect(linked).to_be_visible()
    seen["clips_linked_conditioning"] = linked.evaluate("s => [...s.selectedOptions].map(o => o.value)")
    start_frames = _dataset_card(page, "longcat-video-cond")
    seen["start_frames_type"] = start_frames.locator("select.list-item-type-select").input_value()
    return seen


def _upload_start_frame(page, expect, start_frame: Path, datasets: Path) -> Path:
    """The host's only upload: its dataset wizard's folder browser (into the datasets folder)."""
    page.get_by_role("button", name="Dataset Wizard", exact=True).click()
    wizard = page.locator(".modal-dialog").filter(has_text="Create Dataset")
    expect(wizard.first).to_be_visible()
    page.get_by_placeholder("my-training-images").fill("longcat-preview")
    page.get_by_role("button", name="Next").click()
    page.locator(".backend-card").filter(has_text="Image Dataset").first.click()
    page.locator(".backend-card").filter(has_text="local media backend").first.click()
    page.get_by_role("button", name="Next").click()
    page.get_by_title("Browse directories").locator("visible=true").first.click()
    page.get_by_role("button", name="Create new folder").click()
    page.get_by_placeholder("Enter folder name").fill(PREVIEW_FOLDER)
    page.get_by_title("Create folder").click()
    folder = page.locator(".list-group-item").filter(has_text=PREVIEW_FOLDER).first
    expect(folder).to_be_visible(timeout=60_000)  # the listing reloads from the server (slow under load)
    folder.dblclick()
    page.locator('button.btn-outline-primary[aria-label="Upload files"]').click()  # the folder browser's
    upload = page.locator(".upload-modal-backdrop")
    upload.locator('input[type="file"][multiple]').set_input_files(str(start_frame))
    upload.get_by_role("button", name="Upload files").click()
    expect(upload.get_by_text("1 file(s) uploaded successfully.")).to_be_visible(timeout=60_000)
    upload.get_by_role("button", name="Close upload dialog").click()
    page.get_by_role("button", name="Cancel and close file browser").click()
    page.get_by_role("button", name="Cancel and close wizard").click()
    return datasets / PREVIEW_FOLDER / start_frame.name


def _blank_selects(config: dict) -> list[str]:
    """Keys saved as "" whose option in the host's parser has choices that do not include ""."""
    from simpletuner.helpers.configuration.cmd_args import get_argument_parser

    actions = {action.dest: action for action in get_argument_parser()._actions}
    return sorted(
        key
        for key, value in config.items()
        if value == "" and key in actions and actions[key].choices and "" not in actions[key].choices
    )


def _set_plugin_keys(page, expect) -> dict:
    """The plugin's keys in the Model tab's model-specific section, set as a user sets them."""
    page.get_by_role("button", name="Switch to Full Form").locator("visible=true").first.click()
    section = page.locator("#content-model_specific")
    attention = section.locator('select[name="attention_implementation"]')
    expect(attention).to_be_visible(timeout=60_000)
    seen = {"attention_options": attention.locator("option").evaluate_all("options => options.map(o => o.value)")}
    attention.select_option("sdpa")
    sparsity = section.locator('input[name="longcat_bsa_sparsity"]')
    seen["sparsity_shown"] = sparsity.input_value()
    sparsity.fill(str(UI_KEYS["longcat_bsa_sparsity"]))
    section.locator('[data-field-name="attention_implementation"]').scroll_into_view_if_needed()
    return seen


def _drive_ui(page, expect, server, log, seen: dict, folders: dict, start_frame: Path, shots: Path) -> None:
    """Everything done in the browser, recording what the UI showed into ``seen``."""
    configs, datasets = folders["configs"], folders["datasets"]
    page.goto(server.base_url + "/web/trainer", wait_until="networkidle")
    seen.update(_onboard(page, expect, configs, folders["output"], datasets))
    _wait_for((configs / ENVIRONMENT / "config.json").is_file, 60, "the environment's config.json")
    # The UI switches to the new environment after creating it; reload only once that happened.
    _wait_for(
        lambda: server.get_json("/api/webui/state")["defaults"].get("active_config") == ENVIRONMENT,
        60,
        "the new environment to become the active one",
    )
    seen["created_config"] = _apply_cpu_sizes(folders["work"], configs)
    page.reload(wait_until="networkidle")
    page.get_by_role("button", name="Toggle events panel").click()  # the event dock covers half the page

    _open_tab(page, "Model")
    family = page.locator('select[x-model="model_family"]').first
    expect(family).to_have_value("longcat_video", timeout=60_000)
    seen["family_label"] = _selected_text(family)
    seen["flavour_label"] = _selected_text(page.locator('select[x-model="model_flavour"]').first)
    seen.update(_set_plugin_keys(page, expect))
    page.screenshot(path=str(shots / "model.png"))

    seen.update(_read_datasets(page, expect))
    page.screenshot(path=str(shots / "datasets.png"))
    seen["uploaded"] = _upload_start_frame(page, expect, start_frame, datasets)

    _open_tab(page, "Validation")
    easy_prompt = page.locator('textarea[x-model="validation_prompt"]').first
    expect(easy_prompt).to_be_visible(timeout=60_000)
    easy_prompt.fill(PROMPT)
    page.get_by_role("button", name="Switch to Full Form").locator("visible=true").first.click()
    inputs = page.locator('textarea[name="validation_input"]')
    expect(inputs).to_be_visible()
    inputs.fill(json.dumps([{"path": str(seen["uploaded"]), "prompt": PROMPT}]))
    seen["full_form_prompt"] = page.locator('textarea[name="validation_prompt"]').input_value()
    page.locator('[data-field-name="validation_prompt"]').scroll_into_view_if_needed()
    page.screenshot(path=str(shots / "validation.png"))

    page.get_by_role("button", name="Save configuration").click()
    page.locator("#confirmSaveConfigButton").click()
    config_path = configs / ENVIRONMENT / "config.json"
    seen["saved_config"] = _wait_for(
        lambda: (config := _read_json_when_written(config_path)) and config.get("validation_input") and config,
        60,
        "the saved validation_input",
    )

    # The host's Run needs a detected GPU: on this machine it can only queue the job.
    page.get_by_role("button", name="Start training").click()
    expect(page.get_by_text("Training Queued")).to_be_visible(timeout=60_000)
    seen["run_log"] = _wait_for(
        lambda: "needs 1 GPUs" in (text := server.log()) and text, 60, "the queued job in the server log"
    )
    seen["refused"] = list(log.refused)
    seen["page_errors"] = list(log.page_errors)


@pytest.fixture(scope="module")
def webui_flow(tmp_path_factory):
    problem = missing_setup()
    if problem:
        pytest.fail(problem)
    from playwright.sync_api import expect

    root = tmp_path_factory.mktemp("webui")
    work = root / "work"
    demo.prepare(work)
    # `simpletuner train --env NAME` reads config/NAME/config.json: the UI's configs folder is that config/.
    folders = {"work": work, "configs": root / "config", "output": work / "output", "datasets": work / "datasets"}
    # What the user picks on their own disk to upload: the eval clip's start frame, renamed.
    start_frame = root / "upload" / "walk_start.png"
    start_frame.parent.mkdir()
    shutil.copy(sorted((folders["datasets"] / "longcat-video/val/start_frames").glob("*.png"))[0], start_frame)
    shots = root / "screenshots"
    shots.mkdir()

    seen: dict = {"root": root, "shots": shots}
    with host_server(root / "home") as server, chromium_page(root / "profile", height=1100) as (page, log):
        try:
            _drive_ui(page, expect, server, log, seen, folders, start_frame, shots)
        except Exception:
            page.screenshot(path=str(shots / "failure.png"))
            raise

    # The preview the UI's Run would render, from the environment the UI saved: the host's trainer.
    # One host quirk first: 4.10.1's UI saves unset selects of the tabs it has shown as "", which the
    # host's own argument parser refuses ("invalid choice: ''"); those keys are removed, nothing else.
    saved_path = folders["configs"] / ENVIRONMENT / "config.json"
    saved = json.loads(saved_path.read_text())
    seen["blank_selects"] = _blank_selects(saved)
    saved_path.write_text(json.dumps({k: v for k, v in saved.items() if k not in seen["blank_selects"]}, indent=2))
    seen["train"] = subprocess.run(
        [str(Path(sys.executable).parent / "simpletuner"), "train", "--env", ENVIRONMENT],
        cwd=root,
        env=host_environ(HOME=str(root / "home")),
        capture_output=True,
        text=True,
        timeout=TRAINING_TIMEOUT,
    )
    validation_dir = folders["output"] / "validation_images"
    seen["videos"] = sorted(validation_dir.glob("*.mp4")) if validation_dir.is_dir() else []
    return seen


def test_family_and_flavour_are_picked_in_the_ui(webui_flow):
    assert webui_flow["flavour_options"] == ["Default", "final"]
    created = webui_flow["created_config"]
    assert created["--model_family"] == "longcat_video" and created["--model_flavour"] == "final"
    assert webui_flow["family_label"] == "LongCat-Video"
    assert webui_flow["flavour_label"] == "final"


def test_i2v_datasets_show_their_start_frame_link(webui_flow):
    assert webui_flow["clips_is_i2v"] is True
    assert webui_flow["clips_linked_conditioning"] == ["longcat-video-cond"]
    assert webui_flow["start_frames_type"] == "conditioning"


def test_start_frame_upload_and_prompt_are_saved(webui_flow):
    uploaded = webui_flow["uploaded"]
    assert uploaded.read_bytes() == (webui_flow["root"] / "upload" / uploaded.name).read_bytes()
    saved = webui_flow["saved_config"]
    assert saved["validation_input"] == [{"path": str(uploaded), "prompt": PROMPT}]
    assert saved["validation_prompt"] == PROMPT
    assert saved["model_family"] == "longcat_video" and saved["model_flavour"] == "final"
    assert webui_flow["full_form_prompt"] == PROMPT


def test_plugin_keys_set_in_the_ui_are_saved(webui_flow):
    # The keys reach the form through the host's field registry (fields.register_fields).
    # The host puts an empty "-- Select --" first in every select that is not required.
    assert webui_flow["attention_options"] == ["", *spec.ATTENTION_IMPLEMENTATIONS]
    assert float(webui_flow["sparsity_shown"]) == 0.875
    saved = webui_flow["saved_config"]
    assert saved["attention_implementation"] == UI_KEYS["attention_implementation"]
    assert float(saved["longcat_bsa_sparsity"]) == UI_KEYS["longcat_bsa_sparsity"]
    # ... and the trainer run from that saved file builds the DiT with them.
    result = webui_flow["train"]
    assert "LongCat-Video attention: sdpa (block-sparse sparsity 0.5," in result.stdout + result.stderr


def test_run_queues_for_a_gpu_on_a_machine_without_one(webui_flow):
    assert "Queued training job" in webui_flow["run_log"] and "needs 1 GPUs" in webui_flow["run_log"]


def test_saved_environment_renders_the_image_to_video_preview(webui_flow):
    import av

    result = webui_flow["train"]
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "Collected 1 validation input images." in output
    assert "LongCat-Video sampling: image-to-video (start image in latent frame 0), 64x64, 9 frames" in output
    # Named after the uploaded file: the video itself, and [input | step 0] side by side, 9 frames each.
    previews = [
        video for video in webui_flow["videos"] if video.name.startswith("step_0_validation_input_0_walk_start")
    ]
    (plain,) = [video for video in previews if video.name.endswith("_64x64.mp4")]
    (stitched,) = [video for video in previews if "_64x64-stitched-" in video.name]
    for video, least_width in ((plain, 64), (stitched, 2 * 64)):
        with av.open(str(video)) as container:
            frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
        assert len(frames) == demo.TINY_FRAMES, video.name
        height, width = frames[0].shape[:2]
        assert height >= 64 and width >= least_width, (video.name, frames[0].shape)


def test_the_page_needed_nothing_from_outside(webui_flow):
    assert webui_flow["refused"] == []
    assert webui_flow["page_errors"] == []
