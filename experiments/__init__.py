"""Entry points: `python -m experiments.<pretrain|prepare|bench>`."""
