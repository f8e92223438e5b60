"""The processes: compose the stages into `run`, `worker`, `web` and the demo."""
