"""Example LightningModules and synthetic data for ``oteacheck fit --config examples/<model>/config.yaml``."""
