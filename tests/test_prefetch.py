"""Batches reach the device in order, one ahead; captions padded to one length keep compiled shapes fixed."""

import pytest
import torch

from stages.train.prefetch import DevicePrefetcher, pad_text


def host_batches(n: int):
    for i in range(n):
        yield {"moments": torch.full((2, 3), float(i)), "text": torch.ones(2, i + 1, 4),
               "text_mask": torch.ones(2, i + 1, dtype=torch.bool)}


def test_batches_arrive_in_order_one_fetched_ahead():
    fetched = []

    def source():
        for b in host_batches(3):
            fetched.append(int(b["moments"][0, 0]))
            yield b

    it = DevicePrefetcher(source(), torch.device("cpu"))
    assert int(next(it)["moments"][0, 0]) == 0 and fetched == [0, 1]  # the next one is already on its way
    assert [int(b["moments"][0, 0]) for b in it] == [1, 2]
    with pytest.raises(StopIteration):
        next(it)


def test_int8_features_are_dequantised_on_the_way():
    q = torch.tensor([[[127, -127]]], dtype=torch.int8)
    scale = torch.tensor([[0.5]], dtype=torch.float16)
    batch = next(DevicePrefetcher(iter([{"dino": q, "dino_scale": scale}]), torch.device("cpu")))
    assert set(batch) == {"dino"} and torch.equal(batch["dino"].float(), torch.tensor([[[63.5, -63.5]]]))


def test_captions_padded_to_a_fixed_length_keep_values_and_mask():
    batches = list(DevicePrefetcher(host_batches(3), torch.device("cpu"), text_length=5))
    assert {tuple(b["text"].shape) for b in batches} == {(2, 5, 4)}
    for i, b in enumerate(batches):
        assert b["text_mask"].sum(1).tolist() == [i + 1, i + 1]
        assert torch.all(b["text"][:, : i + 1] == 1) and torch.all(b["text"][:, i + 1 :] == 0)


def test_a_caption_longer_than_the_fixed_length_is_refused():
    with pytest.raises(ValueError, match="more than the cache's maximum"):
        pad_text({"text": torch.ones(1, 6, 2), "text_mask": torch.ones(1, 6, dtype=torch.bool)}, 5)
