"""Side-by-side benchmarks against PEFT (eager and torch.compile): `python -m benchmarks.run`."""
