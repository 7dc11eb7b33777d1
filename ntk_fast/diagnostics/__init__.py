"""What this machine offers: its description and the torch.mm rate that speed figures are reported against."""
