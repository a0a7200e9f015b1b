"""Where the work runs: device and precision, torchrun / FSDP2 and collectives."""
