"""Pre-training methods, one LightningModule per file, addressed by ``class_path``."""
