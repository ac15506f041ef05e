"""Deep Neural Patchworks (seed 04): nested multi-scale patches, hard mining, candidate sampling."""
