"""Files: atomic writes, bounded reads, outputs kept off inputs."""
