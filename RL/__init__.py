"""Driver side: config tree, batch container, data, algorithms, rewards and trainers (`python -m RL.train_vlpo`)."""
