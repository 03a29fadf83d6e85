"""``glm convert`` and ``glm init-tiny``: checkpoint tools over ``model.convert``/``model.tiny``."""

from __future__ import annotations

import sys

from model.convert import convert_checkpoint
from model.quantization import QuantSpec
from model.tiny import init_tiny


def run(args) -> int:
    if args.command == "convert":
        bits = args.quantization_bit_width
        quant = QuantSpec.parse(f"int{bits}" if bits else None, args.quant_group_size)
        info = convert_checkpoint(args.input_folder, args.output_folder, args.target_tp,
                                  progress=True, quant=quant)
        print(f"wrote {info.num_partitions} partition(s) of iteration {info.iteration} to {info.directory}",
              file=sys.stderr)
        return 0
    info = init_tiny(args.directory, preset=args.preset, tp=args.tp, seed=args.seed)
    print(f"wrote a random {args.preset} checkpoint ({info.num_partitions} partition(s)) "
          f"and its tokenizer to {info.directory}", file=sys.stderr)
    return 0
