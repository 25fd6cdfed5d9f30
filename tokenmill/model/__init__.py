"""The transformer as a pure function (transformer.py), its configuration (config.py), loading weights into it
(loader.py), and the transforms that prepare it for a device from outside (cpu.py, gpu.py)."""
