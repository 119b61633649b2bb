"""The ``musetalk15`` baseline family (MuseTalk 1.5 layout, one-step latent regression).

Modules: ``config`` (typed config, no torch), ``model`` (the latent UNet and its spec),
``data`` (feature files → batches), ``family``
(:class:`~generators.musetalk15.family.Musetalk15Family`, registered when imported). The
package imports none of them: :mod:`generators.registry` reads ``config`` to validate a
train section and imports ``family`` on the first lookup of the family.
"""
