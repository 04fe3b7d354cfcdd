"""Model construction: the embedded digits model, loading local diffusers pipelines, the LoRA denoiser."""
