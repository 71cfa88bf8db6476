"""The `8da4w-q41` variant's layers (runners/executorch/export_mixed.py): a
GGUF's Q4_1 weights split into symmetric 4-bit values and scales plus one
offset per block, with nothing lost, and the layer built from them computing
what the de-quantized layer computes, up to the 8-bit activations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize
from torch import nn
from torchao.quantization import Int8DynamicActivationIntxWeightConfig, quantize_
from torchao.quantization.granularity import PerGroup

from runners.executorch import export_mixed


def q41_weight(out: int, inp: int, seed: int = 0) -> torch.Tensor:
    """A weight as a Q4_1 GGUF tensor holds it, de-quantized (by gguf-py)."""
    values = np.random.default_rng(seed).normal(0, 0.05, (out, inp)).astype(np.float32)
    blocks = quantize(values, GGMLQuantizationType.Q4_1)
    return torch.from_numpy(dequantize(blocks, GGMLQuantizationType.Q4_1).reshape(out, inp))


def four_bit(weight: torch.Tensor) -> nn.Linear:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    with torch.no_grad():
        linear.weight.copy_(weight)
    model = nn.Sequential(linear)
    quantize_(
        model,
        Int8DynamicActivationIntxWeightConfig(
            weight_dtype=torch.int4, weight_granularity=PerGroup(32)
        ),
    )
    return model[0]


def test_q41_blocks_split_into_4_bit_values_scales_and_offsets_exactly():
    weight = q41_weight(24, 96)
    k, d, c = export_mixed.q41_parts(weight)
    assert k.dtype == torch.int8 and int(k.min()) >= -8 and int(k.max()) <= 7
    assert d.shape == c.shape == (24, 3)
    rebuilt = d.repeat_interleave(32, 1) * k + c.repeat_interleave(32, 1)
    assert torch.allclose(rebuilt, weight, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "weight",
    [
        torch.randn(8, 64),  # full precision: not Q4_1 blocks
        torch.randn(8, 48),  # not whole blocks of 32
    ],
)
def test_other_weights_are_not_taken_for_q41(weight):
    assert export_mixed.q41_parts(weight) is None


def test_the_exact_layer_computes_the_gguf_layer_up_to_its_8_bit_activations():
    weight = q41_weight(64, 256, seed=1)
    exact = export_mixed._q41_linear(
        four_bit(weight), export_mixed.q41_parts(weight), export_mixed.BlockSums()
    )
    plain = four_bit(weight)  # the weights re-quantized to symmetric 4 bits instead
    x = torch.randn(5, 256)
    with torch.no_grad():
        wanted = x @ weight.T
        exact_error = float((exact(x) - wanted).norm() / wanted.norm())
        plain_error = float((plain(x) - wanted).norm() / wanted.norm())
    # What is left is the per-token 8-bit activations' rounding (~1%); re-quantizing
    # the weights costs several times that.
    assert exact_error < 0.02
    assert plain_error > 3 * exact_error


def test_layers_reading_the_same_input_share_its_block_sums_and_compute_the_same():
    weights = [q41_weight(48, 128, seed=seed) for seed in (2, 3, 4)]
    sums = export_mixed.BlockSums()
    shared = [
        export_mixed._q41_linear(four_bit(w), export_mixed.q41_parts(w), sums) for w in weights
    ]
    alone = [
        export_mixed._q41_linear(four_bit(w), export_mixed.q41_parts(w), export_mixed.BlockSums())
        for w in weights
    ]
    x = torch.randn(3, 128)
    computed = []
    real_sum = torch.Tensor.sum

    def counting_sum(self, *args, **kwargs):
        computed.append(self.shape)
        return real_sum(self, *args, **kwargs)

    with torch.no_grad():
        torch.Tensor.sum = counting_sum
        try:
            outputs = [layer(x) for layer in shared]
        finally:
            torch.Tensor.sum = real_sum
        for out, layer in zip(outputs, alone, strict=True):
            assert torch.equal(out, layer(x))
        assert len(computed) == 1  # q, k and v: one sum of x
        assert torch.equal(sums(x), x.reshape(3, 4, 32).sum(-1))
        other = torch.randn(3, 128)
        assert torch.equal(sums(other), other.reshape(3, 4, 32).sum(-1))  # a new input: new sums
