"""Sampling: the parameters of a request (params.py) and the sampler (sampler.py), a pipeline of vectorised steps
over (B, V) logits: penalties.py, filters.py, candidates.py (the CPU's candidate space) and draw.py."""
