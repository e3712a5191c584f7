"""Analyses of extracted features: linear probes, the CKA family, UMAP, figures, reports."""
