"""Deep Neural Patchworks: nested multi-scale patches, hard mining, candidate sampling."""
