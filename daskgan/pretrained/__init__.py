"""Weights made by other implementations, mapped onto daskgan's networks (NVlabs' StyleGAN2-ADA)."""
