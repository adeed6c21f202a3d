"""ViT backbone, prefix attention and prompt modules."""
