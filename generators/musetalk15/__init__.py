"""The ``musetalk15`` baseline family (MuseTalk 1.5 layout, one-step latent regression).

Importing the package registers :class:`~generators.musetalk15.family.Musetalk15Family`.
"""

from generators.musetalk15.family import Musetalk15Config, Musetalk15Family

__all__ = ["Musetalk15Config", "Musetalk15Family"]
