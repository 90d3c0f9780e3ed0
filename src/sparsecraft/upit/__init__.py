"""UpIT (arXiv 2410.01610): experts from intermediate checkpoints, genetic expansion, router pre-training, upcycling."""
