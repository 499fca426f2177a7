"""minimoe: dense, router-MoE and Autonomy-of-Experts (AoE) transformers from scratch."""
