"""Ray as the engine of kiln's data stages beyond one machine: connecting to (or starting) a
cluster, and running a stage's tasks on it with completion markers, retries and progress."""
