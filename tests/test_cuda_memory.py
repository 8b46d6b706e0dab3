"""The plugin's CUDA allocator default: expandable segments unless the user chose a setting."""

import torch

from simpletuner_longcat_video.core import cuda_memory


def _fake_cuda(monkeypatch) -> list:
    calls: list = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda.memory, "_set_allocator_settings", calls.append, raising=False)
    return calls


def test_expandable_segments_are_set_for_the_process_and_its_children(monkeypatch):
    calls = _fake_cuda(monkeypatch)
    environ: dict = {}
    said = cuda_memory.prefer_expandable_segments(environ)
    assert environ == {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
    assert calls == ["expandable_segments:True"]
    assert "set by the plugin" in said


def test_a_users_own_allocator_setting_is_kept(monkeypatch):
    calls = _fake_cuda(monkeypatch)
    environ = {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:False,max_split_size_mb:512"}
    cuda_memory.prefer_expandable_segments(environ)
    assert environ == {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:False,max_split_size_mb:512"}
    assert calls == []


def test_nothing_changes_without_cuda(monkeypatch):
    calls: list = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda.memory, "_set_allocator_settings", calls.append, raising=False)
    environ: dict = {}
    cuda_memory.prefer_expandable_segments(environ)
    assert environ == {} and calls == []
