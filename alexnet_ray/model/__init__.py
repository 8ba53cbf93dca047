"""Pure-torch reference AlexNet, one Tower, and state-dict split/merge. No Ray, no torch.distributed."""
