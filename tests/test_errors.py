"""user_message: what the command line prints for an error, here one raised inside a real DataLoader worker."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from icnn_compress.errors import DatasetError, RecipeError, user_message


class _Broken(Dataset):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> torch.Tensor:
        raise DatasetError(f"cannot read image img{i}.png: truncated\nsecond line")


def test_a_worker_error_keeps_its_message_and_loses_the_worker_traceback() -> None:
    with pytest.raises(DatasetError) as info:
        next(iter(DataLoader(_Broken(), batch_size=2, num_workers=1)))
    assert "Original Traceback" in str(info.value)  # what torch re-raises in the main process
    assert user_message(info.value) == ("cannot read image img0.png: truncated\nsecond line "
                                        "(raised in a DataLoader worker)")


def test_an_error_raised_in_the_main_process_is_printed_as_it_is() -> None:
    assert user_message(RecipeError("unknown key train.lrr; did you mean train.lr?")) == (
        "unknown key train.lrr; did you mean train.lr?")
