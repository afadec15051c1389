"""Training: synthetic data, datasets, losses and the training loop for OmniPose models."""
