"""Fine-tuning the priors: textured scans -> rendered data set -> LoRA/adapter training."""
