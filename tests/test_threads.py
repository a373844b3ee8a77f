import pytest
import torch

from icnn_compress.runtime.threads import cpu_threads


def test_cpu_threads_sets_and_restores_the_setting_even_on_error():
    before = torch.get_num_threads()
    with cpu_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError), cpu_threads(1):
        raise RuntimeError("boom")
    assert torch.get_num_threads() == before


def test_cpu_threads_none_leaves_the_setting_alone():
    before = torch.get_num_threads()
    with cpu_threads(None):
        assert torch.get_num_threads() == before
    assert torch.get_num_threads() == before
