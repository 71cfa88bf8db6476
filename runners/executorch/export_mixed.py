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
"""

from __future__ import annotations

import sys


def _matches(fqn: str, names: list[str]) -> bool:
    parts = fqn.split(".")
    for name in names:
        if name == "attention" and "attention" in parts:
            return True
        if fqn == name or fqn.startswith(name + "."):
            return True
    return False


def _patch(int8: list[str]) -> None:
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
                intx_choose_qparams_algorithm="hqq_scale_only" if quantize_with_hqq else "affine",
            ),
            filter_fn=four,
        )
        return model

    q.quantize = quantize


def main(argv: list[str]) -> None:
    int8: list[str] = []
    rest: list[str] = []
    i = 0
    while i < len(argv):
        if argv[i] == "--int8":
            int8 = [n for n in argv[i + 1].split(",") if n]
            i += 2
            continue
        rest.append(argv[i])
        i += 1
    _patch(int8)
    from executorch.examples.models.llama import export_llama

    sys.argv = ["export_llama", *rest]
    export_llama.main()


if __name__ == "__main__":
    main(sys.argv[1:])
