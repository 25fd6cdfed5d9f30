"""Measuring: the per-generation metrics log (metrics_log.py), bench suites (suites.py), baselines and the regression
rule (baseline.py), perplexity and golden outputs (quality.py), reports (report.py), peers (peers.py) and GPU model
shapes (gpu_shapes.py)."""
