"""Per-domain metrics (perplexity, exact match, accuracy), general ability, the comparison table across variants and the plots (per-domain bars, router gate heatmaps)."""
