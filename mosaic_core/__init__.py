"""The workload of mosaic-sweep, usable without Ray: attention kernels, Memory Mosaics, tasks, one trial."""
