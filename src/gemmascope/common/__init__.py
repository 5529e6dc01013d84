"""What every step shares: atomic files and versioned JSON, units, devices, progress bars, configs.

Nothing here imports another part of gemmascope, so every step may import it.
"""
