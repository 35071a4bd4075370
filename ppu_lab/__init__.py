"""PPU Lab: parallel parameter updates for neural networks, taught in notebooks.

Modules (each says which notebook explains it):

- ``ppu_lab.config``   quick mode for tests, paths
- ``ppu_lab.timing``   the one timer helper used everywhere
- ``ppu_lab.data``     MNIST loader/downloader, synthetic ridge problems
- ``ppu_lab.ridge``    the ridge objective, its gradient, serial minibatch SGD
- ``ppu_lab.plotting`` figures (take and return a matplotlib Axes)
"""

from ppu_lab.config import quick_mode

__version__ = "0.1.0"
__all__ = ["quick_mode", "__version__"]
