"""Weights: self-describing files and safe checkpoint reading (`io`), the published weights table
(`published`), peer conversion (`convert`) and loading published weights by name (`pretrained`).

This package sits above `models` (it builds networks through the registry) and below `mobilenetv3.factory`,
whose `create_model(pretrained=...)` joins the two; `models` never imports it.
"""
