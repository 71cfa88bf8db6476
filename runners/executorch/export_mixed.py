"""export_llama with mixed-precision weights (the `8da4w-*` mixed variants).

    python -m runners.executorch.export_mixed --int8 output,attention -qmode 8da4w -G 32 ...

Everything after our own `--int8 NAMES` goes to ExecuTorch's export_llama
unchanged. With `-qmode 8da4w`, linear layers whose module path matches one of
NAMES (`output` = the output head, `attention` = every attention projection,
`layers.N` = one whole block) get 8-bit per-channel weights; the others 4-bit
weights in groups of `-G` (HQQ scales, as export_llama's own 8da4w). Both run
with 8-bit dynamic per-token activations on XNNPACK. Why: re-quantizing
SmolLM2's tied 49152x576 output head (and, less so, attention) to 4 bits is
what changes its greedy answers; the feed-forward layers hold most weights.
Run as a subprocess by `prepare.run_export` (no Django here).

With `--q41` (the `8da4w-q41` variant) the 4-bit layers reproduce the GGUF's
own Q4_1 weights exactly instead of re-quantizing them. A Q4_1 block of 32
weights is `w = d*q + m` (q in 0..15, a scale d and a minimum m per block),
which is `d*(q - 8) + (m + 8d)`: the first term is exactly a symmetric 4-bit
weight with scale d in groups of 32 (what XNNPACK's 4-bit kernels run), the
second is one number per block, so `W x = Wsym x + C (S x)` with S summing x
over each block of 32 and C the (out x blocks) table of `m + 8d`: a sum and a
small fp32 linear beside the 4-bit one, the sums shared by the layers that
read the same input. d, q and m are recovered from the
de-quantized checkpoint (the block's minimum is m, its maximum m + 15d); a
layer whose weights are not Q4_1 blocks (another GGUF type) keeps 8-bit
per-channel weights instead.
"""

from __future__ import annotations

import functools
import sys


def _matches(fqn: str, names: list[str]) -> bool:
    parts = fqn.split(".")
    for name in names:
        if name == "attention" and "attention" in parts:
            return True
        if fqn == name or fqn.startswith(name + "."):
            return True
    return False


Q41_BLOCK = 32


def q41_parts(weight):
    """(k, d, c) with `weight == d*k + c` per block of 32 along the input
    dimension (k int8 in -8..7, d and c per (row, block)), or None when the
    weight is not made of Q4_1 blocks."""
    import torch

    out, inp = weight.shape
    if inp % Q41_BLOCK:
        return None
    w = weight.detach().to(torch.float64).reshape(out, inp // Q41_BLOCK, Q41_BLOCK)
    low = w.amin(-1, keepdim=True)
    d = (w.amax(-1, keepdim=True) - low) / 15
    q = torch.where(d > 0, torch.round((w - low) / torch.where(d > 0, d, 1)), 0)
    rebuilt = d * q + low
    if not torch.allclose(rebuilt, w, rtol=0, atol=1e-6 * float(w.abs().max() or 1)):
        return None
    k = (q - 8).to(torch.int8).reshape(out, inp)
    c = (low + 8 * d).squeeze(-1)
    return k, d.squeeze(-1).to(torch.float32), c.to(torch.float32)


def _q41_linear(linear, parts, sums):
    """`linear` (already quantized to 4 bits in groups of 32) made exact:
    its 4-bit values and scales set to the Q4_1 block's, and the blocks'
    `m + 8d` added back through a small fp32 linear over the input's block
    sums (`sums`, a `BlockSums` the model's exact layers share)."""
    import torch
    from torch import nn

    k, d, c = parts
    weight = linear.weight
    with torch.no_grad():
        weight.qdata.copy_(k)
        weight.scale.copy_(d.to(weight.scale.dtype))
        weight.zero_point.zero_()
    correction = nn.Linear(c.shape[1], k.shape[0], bias=False)
    with torch.no_grad():
        correction.weight.copy_(c)
    return _q41_module()(linear, correction, sums)


class BlockSums:
    """The sums of an input over its blocks of 32, computed once for the
    layers that read the same input one after another (q, k and v; the
    feed-forward's gate and up): a layer given the very tensor the previous
    one was given reuses its sums. A reshape and a sum, not a 0/1 matrix
    product, so it costs one add per input value."""

    def __init__(self) -> None:
        self._last: tuple = ()

    def __call__(self, x):
        if self._last and self._last[0] is x:
            return self._last[1]
        sums = x.reshape(*x.shape[:-1], x.shape[-1] // Q41_BLOCK, Q41_BLOCK).sum(-1)
        self._last = (x, sums)
        return sums


@functools.cache
def _q41_module():
    from torch import nn

    class Q41Linear(nn.Module):
        def __init__(self, linear, correction, sums: BlockSums) -> None:
            super().__init__()
            self.linear = linear
            self.correction = correction
            self.sums = sums

        def forward(self, x):
            return self.linear(x) + self.correction(self.sums(x))

    return Q41Linear


def _replace(model, fqn: str, module) -> None:
    parent, _, name = fqn.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, module)


def _patch(int8: list[str], q41: bool = False) -> None:
    import torch
    from executorch.examples.models.llama.source_transformation import quantize as q
    from torch import nn

    original = q.quantize

    def quantize(model, qmode, *args, group_size=None, quantize_with_hqq=True, **kwargs):
        if qmode != "8da4w":
            return original(
                model, qmode, *args, group_size=group_size, quantize_with_hqq=quantize_with_hqq,
                **kwargs,
            )  # fmt: skip
        from torchao.quantization import Int8DynamicActivationIntxWeightConfig, quantize_
        from torchao.quantization.granularity import PerAxis, PerGroup

        group = group_size or 128
        exact: dict[str, tuple] = {}
        if q41:
            group = Q41_BLOCK
            for fqn, module in model.named_modules():
                if isinstance(module, nn.Linear) and not _matches(fqn, int8):
                    parts = q41_parts(module.weight)
                    if parts is None:
                        int8.append(fqn)  # not Q4_1: 8-bit per channel
                    else:
                        exact[fqn] = parts
            print(f"q41: {len(exact)} linear layers exact, 8-bit: {int8}", flush=True)

        def eight(module, fqn: str) -> bool:
            return isinstance(module, nn.Linear) and _matches(fqn, int8)

        def four(module, fqn: str) -> bool:
            return (
                isinstance(module, nn.Linear)
                and not _matches(fqn, int8)
                and module.weight.shape[1] % group == 0
            )

        quantize_(
            model,
            Int8DynamicActivationIntxWeightConfig(
                weight_dtype=torch.int8, weight_granularity=PerAxis(0)
            ),
            filter_fn=eight,
        )
        quantize_(
            model,
            Int8DynamicActivationIntxWeightConfig(
                weight_dtype=torch.int4,
                weight_granularity=PerGroup(group),
                # The exact layers get their Q4_1 values below: no need to search.
                intx_choose_qparams_algorithm="hqq_scale_only"
                if quantize_with_hqq and not q41
                else "affine",
            ),
            filter_fn=four,
        )
        sums = BlockSums()
        for fqn, parts in exact.items():
            _replace(model, fqn, _q41_linear(model.get_submodule(fqn), parts, sums))
        return model

    q.quantize = quantize


def main(argv: list[str]) -> None:
    int8: list[str] = []
    rest: list[str] = []
    q41 = False
    i = 0
    while i < len(argv):
        if argv[i] == "--q41":
            q41 = True
            i += 1
            continue
        if argv[i] == "--int8":
            int8 = [n for n in argv[i + 1].split(",") if n]
            i += 2
            continue
        rest.append(argv[i])
        i += 1
    _patch(int8, q41)
    from executorch.examples.models.llama import export_llama

    sys.argv = ["export_llama", *rest]
    export_llama.main()


if __name__ == "__main__":
    main(sys.argv[1:])
