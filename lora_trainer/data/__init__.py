"""Images and their conditioning: decoding and epoch plans (images.py), buckets, captions, and the latent and text
caches."""
