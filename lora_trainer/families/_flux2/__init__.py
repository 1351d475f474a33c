"""What the FLUX.2 families (flux2: dev; flux2_klein: klein 4B / 9B) share: the transformer, the BatchNorm-normalised
patchified latents, the BFL single-file layout, the fused-q/k/v tool file."""
