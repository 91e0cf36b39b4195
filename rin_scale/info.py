"""Size a model before launching it: `python -m rin_scale.info PRESET [key=value ...]`.

Prints one JSON object: params, gflops (forward, batch 1), interface_tokens, latent_tokens and
the main model settings. Keys may be given as `model.image_size=128` or just `image_size=128`.
"""
from __future__ import annotations

import dataclasses
import json
import sys

from .config import ConfigError, ModelConfig, load_config
from .flops import count

MODEL_KEYS = {f.name for f in dataclasses.fields(ModelConfig)}


def info(preset: str, overrides: list[str] = ()) -> dict:
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
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else 2
    preset, overrides = (argv[0], argv[1:]) if "=" not in argv[0] else ("tiny", argv)
    try:
        print(json.dumps(info(preset, overrides)))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
