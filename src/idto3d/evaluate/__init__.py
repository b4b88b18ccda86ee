"""Evaluation: identity similarity, FID, t-SNE and the HTML report."""
