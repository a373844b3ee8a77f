"""The runtime floor: devices and seeds, atomic files and JSON lines, torchrun ranks and sharding, CPU threads,
the DataLoader factory. Nothing here knows the method; everything above may import it."""
