"""Sampling: the DDIM policy maths (`logprob.py`, pure torch) and the sampler that renders rollouts."""
