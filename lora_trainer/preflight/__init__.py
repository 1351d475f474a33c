"""--validate-only in about a second without torch: config, dataset, base model (probe/), memory and cache plans,
output folder."""
