"""An example third-party pavlit plugin package.

It registers two plugins through the entry points in its ``pyproject.toml`` (nothing registers at import time):

* ``pavlit.provers`` / ``mixture``: :class:`pavlit_example.provers.MixtureProver`, Best-of-K of π with
  probability λ, else π;
* ``pavlit.rewards`` / ``pav_min``: :class:`pavlit_example.rewards.PAVMinReward`, a prefix scored by its weakest
  step's effective reward.

Import the classes from their modules; the package's top level stays free of torch, so importing it is cheap.
"""

__version__ = "0.1.0"
