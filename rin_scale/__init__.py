"""rin_scale: Recurrent Interface Networks trained at scale with DeepSpeed."""
