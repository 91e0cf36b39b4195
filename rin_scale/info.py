"""Size a model before launching it: `python -m rin_scale.info [PRESET] [file.yaml ...] [key=value ...]`.

The arguments are the trainer's (default preset: tiny). Prints one JSON object: params, gflops
(forward, batch 1), interface_tokens, latent_tokens and the main model settings. Model keys may
be given as `model.image_size=128` or just `image_size=128`. A bad argument is one line, exit 2.
"""
from __future__ import annotations

import dataclasses
import json
import sys

from .config import ConfigError, ModelConfig, load_config
from .flops import count

MODEL_KEYS = {f.name for f in dataclasses.fields(ModelConfig)}


def info(preset: str | None = None, overrides: list[str] = ()) -> dict:
    """The sizes of the model that `preset` (None: the first argument, as the trainer reads it,
    or tiny) with YAML files and key=value overrides describes."""
    overrides = [f"model.{o}" if "=" in o and o.split("=", 1)[0] in MODEL_KEYS else o for o in overrides]
    cfg = load_config(preset, overrides)
    m = cfg.model
    out = {"preset": cfg.name, **count(m)}
    out["params_m"] = round(out["params"] / 1e6, 2)
    out["gflops"] = round(out["gflops"], 3)
    out.update(image_size=m.image_size, frames=m.frames, patch_size=m.patch_size, patch_frames=m.patch_frames,
               interface_dim=m.interface_dim, latent_dim=m.latent_dim, num_blocks=m.num_blocks,
               latent_layers=m.latent_layers)
    return out


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0
    unknown = [a for a in argv if a.startswith("--")]
    if unknown:
        print(f"error: unknown option {unknown[0]}: arguments are [PRESET] [file.yaml ...] [key=value ...]",
              file=sys.stderr)
        return 2
    try:
        print(json.dumps(info(None, argv)))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
