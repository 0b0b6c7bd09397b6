"""Images -> backbone features: extraction with its cache, post-processing (L2, PCA, whitening) and the stage
every entry point shares (dataset + backbone + features + split)."""
