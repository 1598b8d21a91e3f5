"""The demo CLIP: contrastive pretraining of the tiny tower on rendered shapes."""
