"""Evaluation: flux-tower GPP, probes, reconstruction reports."""
