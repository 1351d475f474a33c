"""What the Stable Diffusion UNet families (SD1.x, SD2.x, SDXL) share: spec presets, signature rules, adapter, kohya
names, LDM converters, tiny parts."""
