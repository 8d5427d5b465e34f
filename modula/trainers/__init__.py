"""Ray Train stage runners: base pretraining (built-in model only), universal, domain experts (many at once), router; the lora / molora baselines; add-domain; cost accounting."""
