"""Training: one loop for pretraining, SFT and reward modelling; loss, optimizer, parallelism, metrics."""
